"""DICOMweb QIDO-RS, WADO-RS and STOW-RS (issue 6)."""
