"""Benchmark suites: one loader per medical benchmark, each reading its hub dataset or a local
copy in the same layout, into one :class:`Item` schema with a pinned prompt template.

Every loader accepts ``source``: None (the suite's Hugging Face id, through the optional
``datasets`` package, online), a hub id, or a local file/folder laid out as on the hub:

    vqa-rad, pathvqa  parquet files with columns image ({bytes, path} or a path), question, answer;
                      a folder is searched for ``*{split}*.parquet`` (``data/test-00000-of-00001.parquet``)
    slake             ``{split}.json`` (a list of records: img_name, question, answer, q_lang,
                      answer_type OPEN/CLOSED, modality, location, content_type, ...) beside an
                      ``imgs/`` folder or ``imgs.zip``; only ``q_lang == "en"`` is kept
    medqa             jsonl/json/parquet records: question, options {A..D}, answer, answer_idx
    pubmedqa          pqa_labeled records (parquet/jsonl/json): pubid, question, context
                      {contexts: [...]}, long_answer, final_decision; or the original ``ori_pqal.json``
    synthetic-cxr     a folder with ``{split}.jsonl`` (or ``items.jsonl``): image (path relative to
                      the folder), question, answer, answer_type, modality, finding, normal,
                      subgroups {...}. The generator lands separately and writes this layout.

Prompts are pinned per suite (:data:`PROMPT_TEMPLATES`, hashed into report.json) and decoding
is greedy, so two runs of the same artifact give the same answers.

No torch here; ``datasets`` and ``pyarrow`` are imported lazily and are optional.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemed._resources import OFFLINE_FIX, online
from edgemed.errors import BadInputError, MissingDependencyError

__all__ = ["Item", "SUITES", "PROMPT_TEMPLATES", "HUB_IDS", "load_suite", "render_prompt_for",
           "parse_suite_spec", "template_sha256"]


@dataclass
class Item:
    """One benchmark question, whatever suite it came from.

    ``image`` is None (text-only suites), a path, or anything :func:`edgemed.runtime.preprocess.as_image`
    takes (PIL image, uint8 array); a zip member is read into a PIL image at load time.
    ``answer_type`` is "closed" (yes/no or a fixed label set), "open" or "mc" (multiple choice,
    with ``options`` and ``answer_idx``). ``subgroups`` holds the attributes compared per group
    (modality, site, sex, age band...). ``finding`` and ``normal`` serve the hallucination probe:
    a finding-presence question asked of a normal image must be answered "no".
    """

    id: str
    question: str
    answer: str
    answer_type: str
    image: Any = None
    modality: str | None = None
    options: dict[str, str] | None = None
    answer_idx: str | None = None
    context: str | None = None
    labels: tuple[str, ...] | None = None  # closed label set other than yes/no (PubMedQA)
    finding: str | None = None
    normal: bool | None = None
    subgroups: dict[str, str] = field(default_factory=dict)

    def score_record(self, pred: str) -> dict[str, Any]:
        """The mapping edgemed.bench.scoring.score_item reads, with subgroup keys flattened in."""
        rec: dict[str, Any] = {"id": self.id, "pred": pred, "answer": self.answer,
                               "answer_type": {"closed": "CLOSED", "open": "OPEN"}.get(self.answer_type)}
        if self.answer_type == "mc":
            rec.update(options=self.options, answer_idx=self.answer_idx)
        if self.modality is not None:
            rec["modality"] = self.modality
        rec.update({k: v for k, v in self.subgroups.items()})
        return rec


# --------------------------------------------------------------------------------------------
# prompts (pinned; changing one changes every number, so the template's sha256 is reported)

VQA_TEMPLATE = "{question}\nAnswer the question using a single word or phrase."
VQA_CLOSED_TEMPLATE = "{question}\nAnswer yes or no."
MC_TEMPLATE = ("Answer the following multiple choice question with the letter of the correct option.\n\n"
               "{question}\n{options}\nAnswer:")
PUBMEDQA_TEMPLATE = "Context: {context}\n\nQuestion: {question}\nAnswer with yes, no or maybe."

PROMPT_TEMPLATES: dict[str, dict[str, str]] = {
    "synthetic-cxr": {"closed": VQA_CLOSED_TEMPLATE, "open": VQA_TEMPLATE},
    "vqa-rad": {"closed": VQA_TEMPLATE, "open": VQA_TEMPLATE},
    "slake": {"closed": VQA_TEMPLATE, "open": VQA_TEMPLATE},
    "pathvqa": {"closed": VQA_TEMPLATE, "open": VQA_TEMPLATE},
    "medqa": {"mc": MC_TEMPLATE},
    "pubmedqa": {"closed": PUBMEDQA_TEMPLATE},
}

HUB_IDS: dict[str, tuple[str, str | None]] = {
    "vqa-rad": ("flaviagiammarino/vqa-rad", None),
    "slake": ("BoKelvin/SLAKE", None),
    "pathvqa": ("flaviagiammarino/path-vqa", None),
    "medqa": ("GBaker/MedQA-USMLE-4-options", None),
    "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled"),
}
# PubMedQA's labeled set has one split (train); every other suite is scored on test.
DEFAULT_SPLIT = {"pubmedqa": "train"}


def template_sha256(suite: str) -> str:
    return hashlib.sha256(json.dumps(PROMPT_TEMPLATES[suite], sort_keys=True).encode()).hexdigest()


def render_prompt_for(suite: str, item: Item) -> str:
    """The exact user prompt for one item (the session adds the chat template and image block)."""
    templates = PROMPT_TEMPLATES[suite]
    tpl = templates.get(item.answer_type) or next(iter(templates.values()))
    opts = "\n".join(f"{k}. {v}" for k, v in (item.options or {}).items())
    return tpl.format(question=item.question.strip(), options=opts, context=item.context or "")


# --------------------------------------------------------------------------------------------
# record readers


def _parquet_records(path: Path) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(str(path), "pyarrow", "bench") from None
    table = pq.read_table(path)
    yield from table.to_pylist()


def _json_records(path: Path) -> Iterator[dict]:
    if path.suffix == ".jsonl":
        with open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    data = json.loads(path.read_text())
    if isinstance(data, dict):  # PubMedQA's ori_pqal.json: {pubid: record}
        for k, v in data.items():
            yield {"pubid": k, **v} if isinstance(v, dict) else {"key": k, "value": v}
    else:
        yield from data


def _records(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        return _parquet_records(path)
    if path.suffix in (".json", ".jsonl"):
        return _json_records(path)
    raise BadInputError(str(path), f"unsupported file type '{path.suffix}'", "use .parquet, .jsonl or .json")


def _find_split_files(folder: Path, split: str, suffixes: tuple[str, ...]) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    named = [p for p in files if split in p.name]
    if named:
        return named
    if len(files) == 1:
        return files
    raise BadInputError(str(folder), f"no {'/'.join(suffixes)} file for split '{split}' "
                        f"(found: {[p.name for p in files][:8]})",
                        f"pass the file itself, or name it like '{split}.jsonl' / '{split}-00000.parquet'")


def _hub_records(suite: str, hub_id: str, split: str) -> Iterator[dict]:
    if not online():
        raise BadInputError(f"suite {suite}", f"'{hub_id}' would be downloaded from the Hugging Face hub",
                            f"{OFFLINE_FIX}, or pass a local copy: --suite {suite}=PATH")
    try:
        import datasets  # noqa: PLC0415  optional and heavy
    except ImportError:
        raise BadInputError(f"suite {suite}", f"loading '{hub_id}' from the Hugging Face hub needs the "
                            "optional 'datasets' package", f"pip install datasets, or pass a local copy: "
                            f"--suite {suite}=PATH") from None
    default_id, config = HUB_IDS.get(suite, (None, None))
    config = config if hub_id == default_id else None
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # noqa: BLE001  offline, gated or renamed: say which and how to fix
        raise BadInputError(f"suite {suite}", f"could not load '{hub_id}' split '{split}' ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                            f"check the network, or download it and pass --suite {suite}=PATH") from None
    for rec in ds:
        yield dict(rec)


def _hub_file(repo_id: str, filename: str) -> str:
    if not online():
        raise BadInputError(f"{repo_id}/{filename}", "would be downloaded from the Hugging Face hub",
                            f"{OFFLINE_FIX}, or download the dataset and pass a local folder")
    try:
        from huggingface_hub import hf_hub_download  # noqa: PLC0415  optional
    except ImportError:
        raise MissingDependencyError(f"{repo_id}/{filename}", "huggingface_hub") from None
    try:
        return hf_hub_download(repo_id, filename, repo_type="dataset")
    except Exception as e:  # noqa: BLE001  offline or renamed
        raise BadInputError(f"{repo_id}/{filename}", f"could not download ({type(e).__name__})",
                            "check the network, or download the dataset and pass a local folder") from None


def _source_records(suite: str, source: str | Path | None, split: str,
                    suffixes: tuple[str, ...]) -> tuple[Iterator[dict], Path | None]:
    """Records plus the folder images are relative to (None for hub data)."""
    if source is None:
        return _hub_records(suite, HUB_IDS[suite][0], split), None
    path = Path(source)
    if path.is_file():
        return _records(path), path.parent
    if path.is_dir():
        files = _find_split_files(path, split, suffixes)
        return (r for f in files for r in _records(f)), path
    if str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        return _hub_records(suite, str(source), split), None
    raise BadInputError(f"suite {suite} source '{source}'", "no such file or folder",
                        "pass a local copy in the hub layout, or a hub id like org/name")


def _image_from_field(value: Any, base: Path | None) -> Any:
    """HF image columns arrive as {bytes, path} dicts (parquet), PIL images (datasets) or paths."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if value.get("bytes"):
            from PIL import Image

            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
        if value is None:
            return None
    if isinstance(value, (str, Path)):
        p = Path(value)
        return p if p.is_absolute() or base is None else base / p
    return value  # a PIL image from `datasets`


# --------------------------------------------------------------------------------------------
# loaders


def _yes_no_type(answer: str) -> str:
    from edgemed.bench.scoring import YES_NO, normalize_answer

    return "closed" if normalize_answer(answer) in YES_NO else "open"


def _vqa_parquet(suite: str):
    def load(source, split) -> Iterator[Item]:
        recs, base = _source_records(suite, source, split, (".parquet", ".jsonl", ".json"))
        for i, r in enumerate(recs):
            answer = str(r["answer"])
            yield Item(id=f"{suite}-{split}-{i}", question=str(r["question"]), answer=answer,
                       answer_type=_yes_no_type(answer), image=_image_from_field(r.get("image"), base),
                       modality=r.get("modality"))
    return load


def _slake(source, split) -> Iterator[Item]:
    recs, base = _source_records("slake", source, split, (".json",))
    zf = None
    if base is None:  # from the hub: the json rows name images inside the repository's imgs.zip
        zf = zipfile.ZipFile(_hub_file(str(source or HUB_IDS["slake"][0]), "imgs.zip"))
    elif not (base / "imgs").is_dir() and (base / "imgs.zip").is_file():
        zf = zipfile.ZipFile(base / "imgs.zip")
    members = set(zf.namelist()) if zf is not None else set()
    for r in recs:
        if str(r.get("q_lang", "en")).lower() != "en":
            continue
        at = str(r.get("answer_type", "")).strip().upper()
        kind = "closed" if at in ("CLOSED", "CLOSE") else "open" if at == "OPEN" else _yes_no_type(str(r["answer"]))
        img: Any = r.get("img_name")
        if img is not None:
            if zf is not None:
                from PIL import Image

                name = next((n for n in (f"imgs/{img}", img) if n in members), None)
                if name is None:
                    raise BadInputError("SLAKE imgs.zip", f"has no image '{img}'", "use the SLAKE imgs.zip")
                img = Image.open(io.BytesIO(zf.read(name))).convert("RGB")
            else:
                img = base / "imgs" / img
        subgroups = {k: str(r[k]) for k in ("location", "content_type") if r.get(k) is not None}
        yield Item(id=f"slake-{r.get('qid', r.get('img_id', ''))}", question=str(r["question"]),
                   answer=str(r["answer"]), answer_type=kind, image=img, modality=r.get("modality"),
                   subgroups=subgroups)


def _medqa(source, split) -> Iterator[Item]:
    recs, _ = _source_records("medqa", source, split, (".jsonl", ".json", ".parquet"))
    for i, r in enumerate(recs):
        opts = r["options"]
        if isinstance(opts, list):  # some exports store [{key, value}]
            opts = {o["key"]: o["value"] for o in opts}
        yield Item(id=f"medqa-{split}-{i}", question=str(r["question"]), answer=str(r.get("answer", "")),
                   answer_type="mc", options={str(k): str(v) for k, v in opts.items()},
                   answer_idx=str(r["answer_idx"]).strip().upper(),
                   subgroups={"meta_info": str(r["meta_info"])} if r.get("meta_info") else {})


def _pubmedqa(source, split) -> Iterator[Item]:
    recs, _ = _source_records("pubmedqa", source, split, (".parquet", ".jsonl", ".json"))
    for r in recs:
        ctx = r.get("context") if "context" in r else r.get("CONTEXTS")
        if isinstance(ctx, Mapping):
            ctx = ctx.get("contexts")
        context = " ".join(ctx) if isinstance(ctx, list) else str(ctx or "")
        question = r.get("question", r.get("QUESTION"))
        decision = r.get("final_decision")
        if question is None or decision is None:
            raise BadInputError("pubmedqa record", f"lacks question/final_decision (keys: {sorted(r)[:10]})",
                                "use the pqa_labeled config (or ori_pqal.json)")
        yield Item(id=f"pubmedqa-{r.get('pubid', '')}", question=str(question), answer=str(decision),
                   answer_type="closed", context=context, labels=("yes", "no", "maybe"))


def _synthetic_cxr(source, split) -> Iterator[Item]:
    if source is None:
        raise BadInputError("suite synthetic-cxr", "has no hub copy: it is generated locally",
                            "pass the generated folder: --suite synthetic-cxr=PATH")
    path = Path(source)
    if path.is_dir():
        cands = [path / f"{split}.jsonl", path / "items.jsonl"]
        file = next((p for p in cands if p.is_file()), None)
        if file is None:
            raise BadInputError(str(path), f"no {split}.jsonl or items.jsonl", "point at the generated suite folder")
    else:
        file = path
    for i, r in enumerate(_records(file)):
        answer = str(r["answer"])
        at = str(r.get("answer_type") or _yes_no_type(answer)).lower()
        yield Item(id=str(r.get("id", f"synthetic-cxr-{i}")), question=str(r["question"]), answer=answer,
                   answer_type=at, image=_image_from_field(r.get("image"), file.parent),
                   modality=r.get("modality", "cxr"), finding=r.get("finding"), normal=r.get("normal"),
                   subgroups={str(k): str(v) for k, v in (r.get("subgroups") or {}).items()})


SUITES: dict[str, Callable[[Any, str], Iterator[Item]]] = {
    "synthetic-cxr": _synthetic_cxr,
    "vqa-rad": _vqa_parquet("vqa-rad"),
    "slake": _slake,
    "pathvqa": _vqa_parquet("pathvqa"),
    "medqa": _medqa,
    "pubmedqa": _pubmedqa,
}


def parse_suite_spec(spec: str) -> tuple[str, str | None]:
    """``NAME`` (from the hub) or ``NAME=PATH_OR_HUB_ID``."""
    name, _, source = spec.partition("=")
    name = name.strip()
    if name not in SUITES:
        raise BadInputError(f"--suite {spec}", f"unknown suite '{name}'", f"use one of: {', '.join(SUITES)}")
    return name, (source.strip() or None)


def load_suite(name: str, source: str | Path | None = None, *, split: str | None = None,
               limit: int | None = None) -> list[Item]:
    """The suite's items (first ``limit`` of them, in file order, so a limited run is reproducible)."""
    if name not in SUITES:
        raise BadInputError(f"suite '{name}'", "unknown suite", f"use one of: {', '.join(SUITES)}")
    split = split or DEFAULT_SPLIT.get(name, "test")
    out: list[Item] = []
    for item in SUITES[name](source, split):
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise BadInputError(f"suite {name} ({source or HUB_IDS.get(name, ('?',))[0]}, split {split})",
                            "holds no items", "check the split name and the file")
    return out


def iter_subgroup_keys(items: Iterable[Item]) -> list[str]:
    keys: set[str] = set()
    for it in items:
        keys.update(it.subgroups)
        if it.modality is not None:
            keys.add("modality")
    return sorted(keys)
