"""pneumo in the hospital's DICOM flow: a Storage SCP that answers with structured reports, and a DICOMweb worker."""

from pneumo.dicom.analysis import Analyser, AuditLog, Outcome
from pneumo.dicom.dicomweb import DicomWebWorker
from pneumo.dicom.node import Destination, DicomNode, NodeConfig

__all__ = ["Analyser", "AuditLog", "Destination", "DicomNode", "DicomWebWorker", "NodeConfig", "Outcome"]
