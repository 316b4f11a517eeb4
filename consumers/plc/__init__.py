"""`crd plc`: results -> a PLC (OPC UA server or client side, Modbus TCP), confirmed before XACK, never doubled."""
