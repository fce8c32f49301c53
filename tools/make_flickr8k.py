"""Build Flickr8k for data.name=pairs: OUT/dataset_flickr8k.json (Karpathy's layout) and OUT/images/.

Flickr8k (Hodosh, Young and Hockenmaier 2013, "Framing Image Description as a Ranking Task",
JAIR 47) is for research use only; nothing of it is committed here. It comes from two public
repositories, each given as a folder or as a git directory (a clone, or what the ``fetch`` tool
brings) read with ``git archive``:

- the images (8,091 JPEGs at 224 x 224): RlNZLER/Image-Text-Matching at commit
  56a15d913c3f290e2ee896386ece6076c1eea02e, ``data/images/`` (gone at its HEAD);
- the captions and the official 6,000/1,000/1,000 split: edwardcruzcruz/Describiendo_imagenes_keras,
  ``Flickr8k_text/`` (Flickr8k.token.txt: ``<image>#<n>\\t<caption>`` lines with CRLF ends;
  Flickr_8k.trainImages.txt, devImages.txt (the val split), testImages.txt).

Entries naming an image the image copy lacks are dropped, and counted. Run from the project root:

    python tools/make_flickr8k.py --images IMAGES --text TEXT --side 64 OUT   # 64 px for CPU; 0: the originals
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
from pathlib import Path, PurePosixPath

from PIL import Image

IMAGES_COMMIT = "56a15d913c3f290e2ee896386ece6076c1eea02e"
SPLITS = (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"), ("test", "Flickr_8k.testImages.txt"))


def files_of(source: Path, commit: str, path: str) -> dict[str, bytes]:
    """Basename -> bytes of the files under ``path`` of a git directory at ``commit``, or of the
    folder ``source`` itself."""
    if (source / "objects").is_dir() and (source / "HEAD").is_file():  # a git directory: its tree at commit
        tar_bytes = subprocess.run(["git", f"--git-dir={source}", "archive", commit, path], capture_output=True,
                                   check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            return {PurePosixPath(m.name).name: tar.extractfile(m).read() for m in tar if m.isfile()}
    return {p.name: p.read_bytes() for p in sorted(source.iterdir()) if p.is_file()}


def lines(data: bytes) -> list[str]:
    """The non-blank lines of a text file, CRLF or LF ended."""
    return [line for line in data.decode("utf-8").splitlines() if line.strip()]


def captions_by_image(token_file: bytes) -> dict[str, list[str]]:
    """Flickr8k.token.txt's captions by image, in caption-number order."""
    found: dict[str, dict[int, str]] = {}
    for number, line in enumerate(lines(token_file), 1):
        key, sep, caption = line.partition("\t")
        image, hash_, n = key.rpartition("#")
        if not sep or not hash_ or not n.isdigit():
            raise SystemExit(f"Flickr8k.token.txt, line {number}: not '<image>#<n>\\t<caption>': {line[:80]!r}")
        found.setdefault(image, {})[int(n)] = caption.strip()
    return {image: [c for _, c in sorted(caps.items())] for image, caps in found.items()}


def resized(data: bytes, side: int) -> bytes:
    """A JPEG whose shorter side is ``side`` (the original bytes when ``side`` is 0)."""
    if side == 0:
        return data
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        scale = side / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=90)
        return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, required=True, help="the images folder, or Image-Text-Matching's git dir")
    ap.add_argument("--images-commit", default=IMAGES_COMMIT)
    ap.add_argument("--text", type=Path, required=True, help="the Flickr8k_text folder, or Describiendo's git dir")
    ap.add_argument("--text-commit", default="HEAD")
    ap.add_argument("--side", type=int, default=64, help="the shorter side in pixels (0: copy the originals)")
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    images = files_of(args.images, args.images_commit, "data/images")
    text = files_of(args.text, args.text_commit, "Flickr8k_text")
    captions = captions_by_image(text["Flickr8k.token.txt"])
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    entries, dropped = [], []
    for split, list_file in SPLITS:
        for name in lines(text[list_file]):
            name = name.strip()
            if name not in images or not captions.get(name):
                dropped.append(name)
                continue
            (args.out / "images" / name).write_bytes(resized(images[name], args.side))
            entries.append({"filename": name, "imgid": len(entries), "split": split,
                            "sentences": [{"raw": c} for c in captions[name]]})
    doc = {"dataset": "flickr8k", "images": entries}
    (args.out / "dataset_flickr8k.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = {s: sum(e["split"] == s for e in entries) for s, _ in SPLITS}
    print(f"wrote {args.out / 'dataset_flickr8k.json'}: {len(entries)} images ({counts}), "
          f"{sum(len(e['sentences']) for e in entries)} captions; dropped {len(dropped)} image(s) of the split lists "
          f"that the image copy lacks or that have no caption{f' (first: {dropped[0]})' if dropped else ''}")


if __name__ == "__main__":
    main()
