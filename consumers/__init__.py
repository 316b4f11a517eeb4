"""Plant consumers of the results stream: the PLC bridge (`crd plc`) and the line dashboard (`crd dashboard`)."""
