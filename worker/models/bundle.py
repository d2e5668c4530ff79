"""Model bundles: a directory with ``manifest.json`` naming each network's file, public format and SHA-256.

Manifest (schema_version 1)::

    {"bundle_id": "stylegan2-ffhq-prod", "schema_version": 1,
     "components": {"generator": {"format": "stylegan2-rosinality", "path": "stylegan2-ffhq-config-f.pt",
                                  "sha256": "<64 hex>", "config": {}}, ...}}

Component names: ``generator``, ``encoder``, ``identity`` (required), ``attribute``, ``sampler`` (optional).
``path`` is relative to the bundle directory, absolute, or ``pkg://<python package>/<relative path>`` for files
shipped inside an installed package. A component's config may name a weight delta applied on top of its file at
load, ``"delta": {"path": ..., "sha256": ..., "enabled": true}`` (e.g. the project's fine-tune of a package's
generator); an enabled delta is hashed with the other files, handed to the loader as an absolute path, and
appended to the loaded bundle's ``bundle_id`` (``<id>+<component>-delta-<first 12 hex>``), so results made with
and without it never share a fingerprint. Remote (``s3://``) paths are fetched into a local directory by
``worker.storage`` first; this module never touches the network.

Every file's SHA-256 is checked before any checkpoint is unpickled, so a loader only ever reads bytes the
operator pinned. This module also holds the checkpoint helpers the format loaders share (``read_checkpoint``,
``load_strict``): every public format is loaded with ``load_state_dict(strict=True)`` after key mapping, and any
mismatch is a ``CheckpointLayoutError`` naming the file and the first offending keys.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from worker.errors import BundleError, CheckpointLayoutError, HashMismatchError, UnknownComponentError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_COMPONENTS = ("generator", "encoder", "identity")
OPTIONAL_COMPONENTS = ("attribute", "sampler")
COMPONENTS = REQUIRED_COMPONENTS + OPTIONAL_COMPONENTS
PLACEHOLDER_SHA = "FILL_IN"
_CHUNK = 8 << 20  # 8 MiB reads: constant memory for 1 GB checkpoints

# format name -> "module:function"; every loader is ``(path: Path, config: dict) -> nn.Module``, imported lazily.
FORMATS: dict[str, str] = {
    "stylegan2-rosinality": "worker.models.stylegan2:load_rosinality",
    "stylegan2-genforce": "worker.models.stylegan2:load_genforce",
    "e4e": "worker.models.e4e:load_e4e",
    "arcface-irse50": "worker.models.arcface:load_arcface",
    "farl-vitb16": "worker.models.farl:load_farl",
    "lite-generator": "worker.models.lite:load_lite_generator",
    "lite-encoder": "worker.models.lite:load_lite_encoder",
    "dlib-resnet": "worker.models.dlib_resnet:load_dlib_resnet",
    "dcgan-gan-face-generate": "worker.models.dcgan:load_dcgan",
    "keymap-mlp": "worker.algorithm.keymap:load_keymap",
}

# Formats whose loader applies a ``config.delta`` (any other format with a delta is refused, never silently ignored).
DELTA_FORMATS = frozenset({"dcgan-gan-face-generate"})

# Which protocol each role must satisfy once loaded (checked by attribute names, see worker.models.base).
_ROLE_PROTOCOL = {
    "generator": "Generator",
    "encoder": "Encoder",
    "identity": "IdentityModel",
    "attribute": "AttributeModel",
}


# --- checkpoint helpers shared by the format loaders ---------------------------------------------------------------
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def read_checkpoint(path: Path, config: Mapping[str, Any] | None = None) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``.

    A checkpoint that pickles arbitrary Python objects (e.g. an ``argparse.Namespace``) needs
    ``"allow_pickle": true`` in the component config; that is only acceptable because the bundle pins the file's
    SHA-256 before this runs.
    """
    path = Path(path)
    allow_pickle = bool((config or {}).get("allow_pickle", False))
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except FileNotFoundError:
        raise BundleError(f"checkpoint file not found: {path}") from None
    except Exception as exc:  # any unreadable file is a layout error
        hint = "" if allow_pickle else ' (if it pickles Python objects, set "allow_pickle": true in its config)'
        raise CheckpointLayoutError(f"cannot read checkpoint {path.name}: {type(exc).__name__}{hint}") from exc


def sub_dict(obj: Any, key: str, path: Path) -> dict[str, Any]:
    """``obj[key]`` as a dict, or a ``CheckpointLayoutError`` naming the file."""
    if not isinstance(obj, Mapping) or key not in obj or not isinstance(obj[key], Mapping):
        have = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointLayoutError(f"{Path(path).name}: no '{key}' dict in checkpoint (top level: {have})")
    return dict(obj[key])


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keys starting with ``prefix`` with the prefix removed (others dropped)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_strict(module: ModuleT, state: Mapping[str, Any], path: Path, what: str) -> ModuleT:
    """``module.load_state_dict(state, strict=True)``, turning every mismatch into ``CheckpointLayoutError``.

    BatchNorm ``num_batches_tracked`` counters may be absent (checkpoints saved before PyTorch 0.4.1); they carry no
    weights and are filled in. Every other key must be present, expected and of the right shape.
    """
    own = module.state_dict()
    state = {k: v for k, v in state.items()}
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k].clone()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)}!={tuple(own[k].shape)}"
        for k in own
        if k in state and (not torch.is_tensor(state[k]) or tuple(state[k].shape) != tuple(own[k].shape))
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:4]}")
        if wrong:
            parts.append(f"wrong shape {len(wrong)}: {wrong[:4]}")
        raise CheckpointLayoutError(f"{Path(path).name} is not a {what} checkpoint: " + "; ".join(parts))
    state = {k: (v.to(own[k].dtype) if v.is_floating_point() else v) for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients for parameters (inputs can still carry gradients through it)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def check_constant(state: dict[str, Any], key: str, expected: torch.Tensor, path: Path) -> None:
    """Pop a constant buffer (e.g. a blur kernel) from ``state``; it must be present and equal ``expected``."""
    if key not in state:
        raise CheckpointLayoutError(f"{Path(path).name}: missing constant buffer {key}")
    value = state.pop(key)
    if not torch.is_tensor(value) or value.numel() != expected.numel():
        raise CheckpointLayoutError(f"{Path(path).name}: constant buffer {key} has the wrong shape")
    if not torch.allclose(value.detach().float().reshape(-1), expected.float().reshape(-1), atol=1e-6):
        raise CheckpointLayoutError(f"{Path(path).name}: constant buffer {key} differs from the expected filter")


# --- hashing ----------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- manifest -------------------------------------------------------------------------------------------------------
@dataclass
class ModelBundle:
    """The loaded networks of one bundle, on one device, frozen and in eval mode."""

    generator: nn.Module | None
    encoder: nn.Module | None
    identity: nn.Module | None
    attribute: nn.Module | None
    bundle_id: str
    hashes: dict[str, str] = field(default_factory=dict)  # component name -> hex sha256 of its file
    sampler: nn.Module | None = None


def resolve_path(directory: Path, raw: str) -> Path:
    """Manifest ``path`` -> local file path (relative to ``directory``, absolute, or ``pkg://package/rel``)."""
    if not isinstance(raw, str) or not raw:
        raise BundleError("component path must be a non-empty string")
    if raw.startswith("pkg://"):
        rest = raw[len("pkg://") :]
        package, _, rel = rest.partition("/")
        if not package or not rel:
            raise BundleError(f"bad pkg:// path {raw!r}: expected pkg://<package>/<relative path>")
        try:
            root = resources.files(package)
        except (ModuleNotFoundError, TypeError) as exc:
            raise BundleError(
                f"package {package!r} of {raw!r} is not installed (scripts/bootstrap.sh installs the embedded "
                "bundles' packages; or choose another bundle with CANCELABLE_ENGINE__BUNDLE)"
            ) from exc
        return Path(str(root.joinpath(rel)))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", raw):
        raise BundleError(f"remote path {raw!r}: fetch it into a local bundle directory first (worker.storage)")
    p = Path(raw)
    return p if p.is_absolute() else Path(directory) / p


def read_manifest(directory: Path) -> dict[str, Any]:
    """Parse and validate ``<directory>/manifest.json`` (structure only; no hashing)."""
    directory = Path(directory)
    mpath = directory / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"bundle manifest not found: {mpath}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle manifest {mpath} is not valid JSON: {type(exc).__name__}") from exc
    validate_manifest(manifest)
    return manifest


def validate_manifest(manifest: Any) -> None:
    """Raise ``BundleError``/``UnknownComponentError`` for a structurally invalid manifest."""
    if not isinstance(manifest, dict):
        raise BundleError("bundle manifest must be a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"unsupported bundle schema_version {manifest.get('schema_version')!r} (want 1)")
    if not isinstance(manifest.get("bundle_id"), str) or not manifest["bundle_id"]:
        raise BundleError("bundle manifest needs a non-empty string bundle_id")
    comps = manifest.get("components")
    if not isinstance(comps, dict):
        raise BundleError("bundle manifest needs a components object")
    for name, spec in comps.items():
        if name not in COMPONENTS:
            raise UnknownComponentError(f"unknown bundle component {name!r}; known: {list(COMPONENTS)}")
        if not isinstance(spec, dict):
            raise BundleError(f"component {name!r} must be an object")
        fmt = spec.get("format")
        if fmt not in FORMATS:
            raise UnknownComponentError(f"component {name!r}: unknown format {fmt!r}; known: {sorted(FORMATS)}")
        for key in ("path", "sha256"):
            if not isinstance(spec.get(key), str):
                raise BundleError(f"component {name!r} needs a string {key!r}")
        if not isinstance(spec.get("config", {}), dict):
            raise BundleError(f"component {name!r}: config must be an object")
        delta = spec.get("config", {}).get("delta")
        if delta is not None:
            if fmt not in DELTA_FORMATS:
                raise BundleError(f"component {name!r}: format {fmt!r} takes no delta (only {sorted(DELTA_FORMATS)})")
            if not isinstance(delta, dict) or not all(isinstance(delta.get(k), str) for k in ("path", "sha256")):
                raise BundleError(f"component {name!r}: config.delta needs a string 'path' and 'sha256'")
            if not isinstance(delta.get("enabled", True), bool):
                raise BundleError(f"component {name!r}: config.delta.enabled must be true or false")


def enabled_delta(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """A component's ``config.delta`` when present and enabled (``enabled`` defaults to true), else None."""
    delta = spec.get("config", {}).get("delta")
    return dict(delta) if isinstance(delta, dict) and delta.get("enabled", True) else None


def _check_file(directory: Path, what: str, raw_path: str, raw_sha: str) -> str:
    path = resolve_path(directory, raw_path)
    expected = raw_sha.strip().lower()
    if expected == PLACEHOLDER_SHA.lower():
        raise BundleError(f"{what}: sha256 is still {PLACEHOLDER_SHA} (run write_manifest)")
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise BundleError(f"{what}: sha256 must be 64 hex digits")
    if not path.is_file():
        raise BundleError(f"{what}: file not found: {path}")
    actual = sha256_file(path)
    if actual != expected:
        raise HashMismatchError(f"{what}: file {path.name} has sha256 {actual}, manifest says {expected}")
    return actual


def verify_hashes(directory: Path, manifest: dict[str, Any], names: Iterable[str]) -> dict[str, str]:
    """Hash every named component's file (and its enabled delta) against the manifest.

    Returns ``{name: hex digest}``, plus ``{"<name>.delta": hex digest}`` for each enabled delta.
    """
    hashes: dict[str, str] = {}
    for name in names:
        spec = manifest["components"][name]
        hashes[name] = _check_file(directory, f"component {name!r}", spec["path"], spec["sha256"])
        delta = enabled_delta(spec)
        if delta is not None:
            what = f"component {name!r} delta"
            hashes[f"{name}.delta"] = _check_file(directory, what, delta["path"], delta["sha256"])
    return hashes


def loader_for(fmt: str):
    """The ``(path, config) -> nn.Module`` loader of a format, imported on first use."""
    try:
        target = FORMATS[fmt]
    except KeyError:
        raise UnknownComponentError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}") from None
    module_name, _, func = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, func)
    except (ImportError, AttributeError) as exc:
        raise UnknownComponentError(f"format {fmt!r}: loader {target} is not available") from exc


def _check_role(name: str, module: Any, fmt: str) -> None:
    proto_name = _ROLE_PROTOCOL.get(name)
    if proto_name is None:
        return
    from worker.models import base

    if not isinstance(module, getattr(base, proto_name)):
        raise BundleError(f"component {name!r}: format {fmt!r} does not provide a {proto_name}")


def load_bundle(directory: Path | str, device: torch.device | str = "cpu", components: Iterable[str] | None = None):
    """Verify and load a bundle -> ``ModelBundle`` (frozen modules on ``device``).

    ``components`` restricts loading to those names (others stay ``None``); by default every component in the
    manifest is loaded and generator, encoder and identity must be present. All selected files are hashed before
    the first one is read by a loader.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    present = manifest["components"]
    if components is None:
        for req in REQUIRED_COMPONENTS:
            if req not in present:
                raise BundleError(f"bundle {manifest['bundle_id']!r} has no {req!r} component")
        names = [n for n in COMPONENTS if n in present]
    else:
        names = list(dict.fromkeys(components))
        for n in names:
            if n not in COMPONENTS:
                raise UnknownComponentError(f"unknown bundle component {n!r}; known: {list(COMPONENTS)}")
            if n not in present:
                raise BundleError(f"bundle {manifest['bundle_id']!r} has no {n!r} component")
    hashes = verify_hashes(directory, manifest, names)
    loaded: dict[str, nn.Module] = {}
    device = torch.device(device)
    bundle_id = manifest["bundle_id"]
    for name in names:
        spec = present[name]
        loader = loader_for(spec["format"])
        config = dict(spec.get("config", {}))
        config.pop("delta", None)
        delta = enabled_delta(spec)
        if delta is not None:
            config["delta"] = {"path": str(resolve_path(directory, delta["path"])), "sha256": hashes[f"{name}.delta"]}
            bundle_id = f"{bundle_id}+{name}-delta-{hashes[f'{name}.delta'][:12]}"
        module = loader(resolve_path(directory, spec["path"]), config)
        _check_role(name, module, spec["format"])
        loaded[name] = freeze(module.to(device))
    return ModelBundle(
        generator=loaded.get("generator"),
        encoder=loaded.get("encoder"),
        identity=loaded.get("identity"),
        attribute=loaded.get("attribute"),
        sampler=loaded.get("sampler"),
        bundle_id=bundle_id,
        hashes=hashes,
    )


def manifest_for(
    directory: Path | str, components: Mapping[str, Mapping[str, Any]] | None = None, bundle_id: str | None = None
) -> dict[str, Any]:
    """A manifest dict with every file's SHA-256 computed.

    ``components`` maps name -> ``{"format", "path", "config"?}`` (any ``sha256`` given is replaced). Without it the
    existing ``manifest.json`` of ``directory`` is re-hashed (e.g. to fill in ``FILL_IN`` placeholders), keeping its
    other sections (``engine`` advice, ``calibration``, ...).
    """
    directory = Path(directory)
    existing: dict[str, Any] = {}
    if components is None:
        mpath = directory / MANIFEST_NAME
        if not mpath.is_file():
            raise BundleError(f"no components given and no manifest at {mpath}")
        try:
            existing = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"bundle manifest {mpath} is not valid JSON") from exc
        components = existing.get("components", {})
        bundle_id = bundle_id or existing.get("bundle_id")
    if not bundle_id:
        bundle_id = directory.resolve().name
    out: dict[str, Any] = {"bundle_id": bundle_id, "schema_version": SCHEMA_VERSION, "components": {}}
    out.update({k: v for k, v in existing.items() if k not in out})
    for name, spec in components.items():
        spec = dict(spec)
        path = resolve_path(directory, spec.get("path", ""))
        if not path.is_file():
            raise BundleError(f"component {name!r}: file not found: {path}")
        config = dict(spec.get("config", {}))
        if isinstance(config.get("delta"), dict):
            delta = dict(config["delta"])
            dpath = resolve_path(directory, delta.get("path", ""))
            if not dpath.is_file():
                raise BundleError(f"component {name!r} delta: file not found: {dpath}")
            config["delta"] = {**delta, "sha256": sha256_file(dpath)}
        out["components"][name] = {
            "format": spec.get("format"),
            "path": spec["path"],
            "sha256": sha256_file(path),
            "config": config,
        }
    validate_manifest(out)
    return out


def write_manifest(
    directory: Path | str, components: Mapping[str, Mapping[str, Any]] | None = None, bundle_id: str | None = None
) -> Path:
    """Compute hashes (see ``manifest_for``) and write ``<directory>/manifest.json``; returns its path."""
    directory = Path(directory)
    manifest = manifest_for(directory, components, bundle_id)
    mpath = directory / MANIFEST_NAME
    tmp = mpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(mpath)
    return mpath
