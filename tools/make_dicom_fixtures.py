#!/usr/bin/env python3
"""Writes the small DICOM fixtures for Tests/ConvirtIOTests/DICOMTests.swift with pydicom.

Every image is 64 x 48 (columns x rows) and holds a known integer pattern that the Swift tests recompute:

    explicit_8bit_mono2.dcm      explicit VR LE, 8-bit MONOCHROME2, PatientID PAT-8,  v = (x*3 + y*5) % 256
    implicit_16bit_12stored.dcm  implicit VR LE, 16 allocated / 12 stored, unsigned,   v = (x*65 + y*87) % 4096
    explicit_16bit_mono1.dcm     explicit VR LE, 16 / 10 stored, MONOCHROME1,          v = (x*16 + y*21) % 1024
    explicit_16bit_signed.dcm    explicit VR LE, 16 / 12 stored, signed, slope 1 / intercept -1024,
                                 v = (x*65 + y*87) % 4096 - 2048
    jpeg_baseline_8bit.dcm       JPEG baseline (1.2.840.10008.1.2.4.50), 8-bit MONOCHROME2, a basic offset table
                                 with one entry and the frame split over two fragments,  v = x*2 + y*2
    nested_sequence_explicit.dcm explicit VR LE, 8-bit, an undefined-length sequence with undefined-length items
                                 holding a nested undefined-length sequence (whose item has its own Rows = 999)
                                 before Rows/Columns and the pixel data,                 v = (x*3 + y*5) % 256
    nested_sequence_implicit.dcm the same in implicit VR LE
    no_preamble_implicit.dcm     no preamble, no DICM, no file meta: the data set starts at a group-0008 tag,
                                 implicit VR LE, 8-bit,                                  v = (x*3 + y*5) % 256

and broken files, which must produce errors naming the problem:

    truncated_pixel_data.dcm     explicit_8bit_mono2.dcm cut in the middle of its pixel data
    truncated_header.dcm         explicit_8bit_mono2.dcm cut inside the value of an element of the data set
    not_dicom.dcm                a text file
    jpeg2000_unsupported.dcm     transfer syntax JPEG 2000 (1.2.840.10008.1.2.4.90) with dummy encapsulated data

The output is deterministic (fixed UIDs, fixed JPEG encoder settings), so rerunning gives the same bytes.

    pip install pydicom numpy pillow
    python3 tools/make_dicom_fixtures.py [--out Tests/ConvirtIOTests/Fixtures/dicom]
"""
import argparse
import io
import os

import numpy as np
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000Lossless,
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

COLUMNS, ROWS = 64, 48


def pattern(fn, dtype):
    y, x = np.mgrid[0:ROWS, 0:COLUMNS]
    return fn(x, y).astype(dtype)


def pattern8():
    return pattern(lambda x, y: (x * 3 + y * 5) % 256, np.uint8)


def dataset(name, transfer_syntax, bits_allocated, bits_stored, signed=False, photometric="MONOCHROME2"):
    uid = generate_uid(entropy_srcs=[name])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "OT"
    ds.PatientName = "Test^Fixture"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    return ds


def save(ds, path, implicit=False):
    dcmwrite(path, ds, implicit_vr=implicit, little_endian=True, enforce_file_format=True)


def code_item(value, meaning):
    item = Dataset()
    item.is_undefined_length_sequence_item = True
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    item.Rows = 999  # a nested Rows that the reader must not take for the image's
    return item


def nested_sequence(ds):
    """(0008,1140) ReferencedImageSequence, undefined length, two undefined-length items; the first holds
    (0040,A170) PurposeOfReferenceCodeSequence, itself undefined length, and a defined-length sequence."""
    first = Dataset()
    first.is_undefined_length_sequence_item = True
    first.ReferencedSOPClassUID = SecondaryCaptureImageStorage
    first.ReferencedSOPInstanceUID = generate_uid(entropy_srcs=["referenced-1"])
    first.PurposeOfReferenceCodeSequence = Sequence([code_item("121311", "Localizer"), code_item("121312", "Other")])
    first["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    first.ConceptNameCodeSequence = Sequence([code_item("111", "Defined length")])  # defined length
    second = Dataset()
    second.is_undefined_length_sequence_item = True
    second.ReferencedSOPClassUID = SecondaryCaptureImageStorage
    second.ReferencedSOPInstanceUID = generate_uid(entropy_srcs=["referenced-2"])
    ds.ReferencedImageSequence = Sequence([first, second])
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.BodyPartExamined = "CHEST"  # (0018,0015), after the sequence


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="Tests/ConvirtIOTests/Fixtures/dicom")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    path = lambda name: os.path.join(out, name)

    ds = dataset("explicit_8bit_mono2", ExplicitVRLittleEndian, 8, 8)
    ds.PatientID = "PAT-8"
    ds.PixelData = pattern8().tobytes()
    save(ds, path("explicit_8bit_mono2.dcm"))

    ds = dataset("implicit_16bit_12stored", ImplicitVRLittleEndian, 16, 12)
    ds.PixelData = pattern(lambda x, y: (x * 65 + y * 87) % 4096, "<u2").tobytes()
    save(ds, path("implicit_16bit_12stored.dcm"), implicit=True)

    ds = dataset("explicit_16bit_mono1", ExplicitVRLittleEndian, 16, 10, photometric="MONOCHROME1")
    ds.PixelData = pattern(lambda x, y: (x * 16 + y * 21) % 1024, "<u2").tobytes()
    save(ds, path("explicit_16bit_mono1.dcm"))

    ds = dataset("explicit_16bit_signed", ExplicitVRLittleEndian, 16, 12, signed=True)
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = pattern(lambda x, y: (x * 65 + y * 87) % 4096 - 2048, "<i2").tobytes()
    save(ds, path("explicit_16bit_signed.dcm"))

    ds = dataset("jpeg_baseline_8bit", JPEGBaseline8Bit, 8, 8)
    ds.PatientID = "RSNA-LIKE"
    buffer = io.BytesIO()
    Image.fromarray(pattern(lambda x, y: x * 2 + y * 2, np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buffer.getvalue()], fragments_per_frame=2, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    save(ds, path("jpeg_baseline_8bit.dcm"))

    for implicit, name in [(False, "nested_sequence_explicit"), (True, "nested_sequence_implicit")]:
        ds = dataset(name, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian, 8, 8)
        nested_sequence(ds)
        ds.PixelData = pattern8().tobytes()
        save(ds, path(name + ".dcm"), implicit=implicit)

    ds = dataset("no_preamble_implicit", ImplicitVRLittleEndian, 8, 8)
    del ds.file_meta
    ds.preamble = None
    ds.PixelData = pattern8().tobytes()
    dcmwrite(path("no_preamble_implicit.dcm"), ds, implicit_vr=True, little_endian=True, enforce_file_format=False)

    # Broken files.
    with open(path("explicit_8bit_mono2.dcm"), "rb") as f:
        good = f.read()
    pixel_start = good.index(b"\xe0\x7f\x10\x00") + 12  # tag, VR "OB"/"OW", 2 reserved bytes, 4-byte length
    with open(path("truncated_pixel_data.dcm"), "wb") as f:
        f.write(good[: pixel_start + COLUMNS * ROWS // 2])
    name_value = good.index(b"Test^Fixture")
    with open(path("truncated_header.dcm"), "wb") as f:
        f.write(good[: name_value + 4])
    with open(path("not_dicom.dcm"), "wb") as f:
        f.write(b"This is a radiology report, not an image.\n" * 4)

    ds = dataset("jpeg2000_unsupported", JPEG2000Lossless, 8, 8)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])  # a J2K marker, then nothing useful
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    save(ds, path("jpeg2000_unsupported.dcm"))

    for name in sorted(os.listdir(out)):
        print(f"{os.path.join(out, name)}: {os.path.getsize(os.path.join(out, name))} bytes")


if __name__ == "__main__":
    main()
