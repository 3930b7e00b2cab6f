"""HL7 v2 over MLLP: framing and server (mllp), reading (charset, text, fields) and mapping (mapping),
ACKs (ack), the per-message pipeline (receive) and the listener process (listener).
docs/hl7-mapping.md has the field table."""
