"""The release's descriptions for the places people load datasets from.

    README.md       a dataset card: the YAML header the Hugging Face Hub reads, then the
                    datasheet, then how to load the release (datasets, torch, MONAI, Croissant)
    croissant.json  Croissant 1.0 metadata (JSON-LD, http://mlcommons.org/croissant/1.0): the
                    files, and a record set `samples` that joins each image of images/ with its
                    labels in metadata.csv

Both are deterministic (no dates), and `export` checks them for identifiers like every other file.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from unpersonal.release import IMAGES_FOLDER, METADATA_FILE

CROISSANT = "http://mlcommons.org/croissant/1.0"
RELEASE_NAME = "unpersonal-synthetic-release"
# The folder the card's code reads; a user puts the release's path there.
FOLDER_PLACEHOLDER = "path/to/this/release"

# The JSON-LD context every Croissant 1.0 file carries (the specification's section "Dataset-level
# information"); mlcroissant warns when it differs.
_CR_TERMS = ("citeAs column conformsTo data dataType examples extract field fileProperty "
             "fileObject fileSet format includes isLiveDataset jsonPath key md5 parentField "
             "path recordSet references regex repeated replace samplingRate separator source "
             "subField transform equivalentProperty").split()
_TYPED_TERMS = {"data": {"@id": "cr:data", "@type": "@json"},
                "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
                "examples": {"@id": "cr:examples", "@type": "@json"},
                "conformsTo": "dct:conformsTo"}
CROISSANT_CONTEXT: dict[str, Any] = {
    "@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
    "dct": "http://purl.org/dc/terms/",
    **{term: _TYPED_TERMS.get(term, f"cr:{term}") for term in _CR_TERMS}}


def summary(sheet: dict[str, Any]) -> str:
    """One sentence on what the release is."""
    what = sheet["what"]
    return (f"{what['images']:,} synthetic {what['resolution']} px grey images "
            f"({what['bit_depth']}-bit) with {what['label_kind']} labels "
            f"({', '.join(what['labels'])}), made with {sheet['made_with']}")


def size_category(count: int) -> str:
    """The Hub's size bin for a number of examples."""
    bins = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
            (1_000_000, "100K<n<1M")]
    return next((name for limit, name in bins if count < limit), "n>1M")


def dataset_card(sheet: dict[str, Any], datasheet: str) -> str:
    """README.md: the Hub's metadata header, the datasheet (`datasheet`, Markdown) and loading."""
    header = {"pretty_name": f"Synthetic images ({sheet['what']['resolution']} px), "
                             f"{sheet['made_with']}",
              "task_categories": ["image-classification"],
              "tags": ["synthetic", "medical-imaging", "privacy", "unpersonal"],
              "size_categories": [size_category(sheet["what"]["images"])]}
    return ("---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + datasheet
            + "\n" + loading(sheet["what"]["labels"]))


def loading(label_names: list[str]) -> str:
    """The card's section on loading the release; every code block runs as written once
    `folder` names the release (a test runs them)."""
    first = label_names[0]
    return f"""## Loading

`metadata.csv` lists every image (`file_name`, from this folder) with one 0/1 column per label
({", ".join(f"`{name}`" for name in label_names)}).

With Hugging Face `datasets` (`release.with_format("torch")` gives torch tensors):

```python
from datasets import load_dataset

folder = "{FOLDER_PLACEHOLDER}"
release = load_dataset("imagefolder", data_dir=folder, split="train")
image, label = release[0]["image"], release[0]["{first}"]
```

As a MONAI dataset, images as float tensors of shape (1, H, W) in [0, 1]:

```python
import csv
from pathlib import Path

from monai.data import Dataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

folder = Path("{FOLDER_PLACEHOLDER}")
labels = {label_names!r}
with open(folder / "metadata.csv", newline="") as table:
    items = [{{"image": str(folder / row["file_name"]),
              "label": [int(row[name]) for name in labels]}} for row in csv.DictReader(table)]
release = Dataset(items, Compose([LoadImaged("image", image_only=True),
                                  EnsureChannelFirstd("image"), ScaleIntensityd("image")]))
image, label = release[0]["image"], release[0]["label"]
```

With Croissant (`mlcroissant`), each record an image and its labels:

```python
from pathlib import Path

import mlcroissant

folder = Path("{FOLDER_PLACEHOLDER}")
records = mlcroissant.Dataset(jsonld=str(folder / "croissant.json")).records("samples")
record = next(iter(records))
image, label = record["samples/image"], record["samples/{first}"]
```
"""


def croissant(sheet: dict[str, Any], metadata_csv: bytes) -> dict[str, Any]:
    """croissant.json for a release whose labels are `metadata_csv` (as export writes it)."""
    def field(name: str, data_type: str, source: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"@type": "cr:Field", "@id": name, "name": name, "dataType": data_type,
                "source": source, **more}

    def column(name: str) -> dict[str, Any]:
        return {"fileObject": {"@id": METADATA_FILE}, "extract": {"column": name}}

    images = {"fileSet": {"@id": IMAGES_FOLDER}}
    return {
        "@context": CROISSANT_CONTEXT, "@type": "sc:Dataset", "conformsTo": CROISSANT,
        "name": RELEASE_NAME, "description": summary(sheet) + ". " + sheet["intended_use"],
        "distribution": [
            {"@type": "cr:FileObject", "@id": METADATA_FILE, "name": METADATA_FILE,
             "contentUrl": METADATA_FILE, "encodingFormat": "text/csv",
             "sha256": hashlib.sha256(metadata_csv).hexdigest()},
            {"@type": "cr:FileSet", "@id": IMAGES_FOLDER, "name": IMAGES_FOLDER,
             "encodingFormat": "image/png", "includes": f"{IMAGES_FOLDER}/*.png"}],
        "recordSet": [
            {"@type": "cr:RecordSet", "@id": "files", "name": "files",
             "description": "The image files of images/, by their path from the release.",
             "field": [field("files/file_name", "sc:Text",
                             {**images, "extract": {"fileProperty": "filepath"},
                              "transform": {"regex": f"^.*/({IMAGES_FOLDER}/[^/]*)$"}}),
                       field("files/image", "sc:ImageObject",
                             {**images, "extract": {"fileProperty": "content"}})]},
            {"@type": "cr:RecordSet", "@id": "samples", "name": "samples",
             "description": "One record per image: the image and its labels.",
             "field": [field("samples/file_name", "sc:Text", column("file_name"),
                             references={"field": {"@id": "files/file_name"}}),
                       field("samples/image", "sc:ImageObject", {"field": {"@id": "files/image"}}),
                       *(field(f"samples/{label}", "sc:Integer", column(label))
                         for label in sheet["what"]["labels"])]}]}


def croissant_json(sheet: dict[str, Any], metadata_csv: bytes) -> bytes:
    return (json.dumps(croissant(sheet, metadata_csv), indent=2) + "\n").encode()
