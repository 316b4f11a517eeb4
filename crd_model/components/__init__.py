"""The building blocks of a CRD branch: crossmodal filter and amplifier, one-class bottleneck, student decoder."""
