"""DICOM header reading: how fast the image check (images.check_images) and --group-col dicom:KEYWORD
(images.dicom_values) read the headers of many small DICOM files.

    python benchmarks/dicom_headers.py               # 10,000 files of 64x64, 16-bit
    python benchmarks/dicom_headers.py --files 2000 --size 512

The files are written with pydicom to a temporary folder (a warm disk cache: the figure is the parsing and
threading cost, not a cold disk's or a network drive's). Each reader runs --rounds times; the best is reported.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import images  # noqa: E402
from devices import decode_threads  # noqa: E402


def write_files(folder, count, size):
    """`count` CT-like DICOM files of size x size 16-bit pixels, 5 per patient; returns their names."""
    pixels = np.random.default_rng(0).integers(0, 4096, (size, size)).astype(np.uint16).tobytes()
    names = []
    for i in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.Modality = f"P{i // 5:05d}", "CT"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 40, 400
        ds.PixelData = pixels
        name = f"{i:06d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        names.append(name)
    return names


def best_of(rounds, run):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="how many DICOM files")
    parser.add_argument("--size", type=int, default=64, help="rows and columns of each image")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each reader; the best is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        names = write_files(folder, args.files, args.size)
        print(f"wrote {args.files} files of {args.size}x{args.size} in {time.perf_counter() - started:.1f} s")
        samples = pd.DataFrame({"image": names, "line": 0})
        paths = [folder / name for name in names]
        threads = 4 * decode_threads()
        for what, run in (
            ("check_images (header check)", lambda: images.check_images(samples, folder, "bench")),
            ("dicom_values PatientID (--group-col dicom:PatientID)", lambda: images.dicom_values(paths, "PatientID")),
        ):
            seconds = best_of(args.rounds, run)
            print(f"{what}: {seconds:.2f} s, {args.files / seconds:,.0f} headers/s ({threads} threads)")


if __name__ == "__main__":
    main()
