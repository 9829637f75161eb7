"""The heatmap overlay pneumo stores beside the report: a complete Secondary Capture Image.

Built with highdicom's ``SCImage.from_ref_dataset`` from the tolerant copy of the source's header
(:func:`pneumo.dicom.header.tolerant_copy`), in pneumo's overlay series of the source's study. What
highdicom leaves to the caller is filled here so that ``dciodvfy`` finds nothing missing:
Body Part Examined and Laterality (General Series, Type 2C: absent for the chest), the source image
reference, the derivation, the burned-in annotation flag, the algorithm in the Contributing
Equipment Sequence and the caution in the series description and image comments.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from pneumo.dicom.codes import (
    MANUFACTURER,
    SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER,
    ModelInfo,
    derived_uid,
    instance_number,
    sc_series_uid,
)
from pneumo.dicom.header import tolerant_copy
from pneumo.dicom.sr import contributing_equipment


def build_overlay(source: Dataset, model: ModelInfo, overlay_rgb: np.ndarray, label: str) -> Dataset:
    """A Secondary Capture of the heatmap overlay, in pneumo's overlay series of the source's study.

    Args:
        source: the source image's header (copied through :func:`~pneumo.dicom.header.tolerant_copy`).
        model: the model whose evidence the overlay shows.
        overlay_rgb: (H, W, 3) uint8 picture (``Explanation.overlay()``).
        label: the answer the heatmap explains, written into the image comments.
    """
    import highdicom as hd

    source, _ = tolerant_copy(source)
    pixels = np.ascontiguousarray(overlay_rgb, dtype=np.uint8)
    orientation = source.get("PatientOrientation")
    has_orientation = orientation is not None and len(orientation) == 2
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=sc_series_uid(str(source.StudyInstanceUID), model),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(str(source.SOPInstanceUID), "pneumo-sc", model.name, model.version),
        instance_number=instance_number(str(source.SOPInstanceUID), "sc"),
        manufacturer=MANUFACTURER,
        # highdicom insists on an orientation; the overlay is the source resized, never turned, so the
        # source's own value is right. Where the source has none, it is emptied below (DICOM: unknown).
        patient_orientation=tuple(orientation) if has_orientation else ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    capture.SpecificCharacterSet = "ISO_IR 192"
    capture.PatientOrientation = list(orientation) if has_orientation else []
    # An overlay exists only for a result, which the intended-use gate let through: the chest, an unpaired
    # body part, for which Laterality (Type 2C) must be absent; dciodvfy needs the body part to know that.
    capture.BodyPartExamined = str(source.get("BodyPartExamined", "") or "CHEST")
    if source.get("Laterality"):
        capture.Laterality = source.Laterality
    capture.SeriesDescription = SC_SERIES_DESCRIPTION
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.BurnedInAnnotation = "NO"
    capture.ImageComments = f"CAM evidence for {label} ({model.name} {model.version}); NOT FOR DIAGNOSTIC USE."
    capture.DerivationDescription = "Class activation map of the model's decision laid over the source radiograph."
    capture.ContributingEquipmentSequence = [contributing_equipment(model)]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = [ref]
    return capture
