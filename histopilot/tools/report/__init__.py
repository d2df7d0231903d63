"""Synoptic reports: schemas modelled on the CAP protocols, with the evidence for each value."""
