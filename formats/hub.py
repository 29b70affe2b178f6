"""Models by their hub name: which files a conversion reads, fetched into huggingface_hub's cache.

`python convert_weights.py stabilityai/stable-diffusion-xl-base-1.0 OUT` reads the same folder a
download by hand would give, but only what the conversion needs: the configs, the tokenizers, one
weight file (or one set of shards) per component, the release's refiner/ and scheduler/. The cache
is huggingface_hub's own (HF_HOME, HF_HUB_CACHE); so are the progress bars. When the hub cannot be
reached (HF_HUB_OFFLINE=1, no network) the cached copy is used, and what it lacks is named in one
line. A local path that exists always wins over a hub name.

- `is_hub_name`: whether a value is no existing path but an "owner/name" repository id.
- `selection`: from a repository's file names, the files to fetch and the required ones it lacks.
- `fetch`: a repository's snapshot folder holding the selection (`fetch_online`, `fetch_offline`).
- `local_sources`: SRC, --video-unet and --tokenizers of convert_weights.py as local paths.
"""

import glob
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from infra.files import listing, read_json_object

SHOWN = 5  # file names listed per message


class HubError(ValueError):
    """A hub name that cannot be had: one line naming the option, the repository and the files."""


# 1. Names.


def is_repo_id(value: str) -> bool:
    """Whether `value` is a repository id of the form "owner/name" (a bare "name" is taken for a path)."""
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return value.count("/") == 1


def is_hub_name(value: str | None) -> bool:
    """Whether an option's value is to be fetched: no existing path, and a repository id."""
    return value is not None and not Path(value).exists() and is_repo_id(value)


def repository(repo_id: str, revision: str | None) -> str:
    return repo_id + (f" at revision {revision}" if revision else "")


# 2. Which files: from a repository's file names (the hub's listing, or a cached snapshot's files).


@dataclass(frozen=True)
class Wanted:
    """The folders of a repository that a conversion reads, by what it reads from each."""

    models: tuple[str, ...] = ()  # config.json and one weight file (or shard set) each
    configs: tuple[str, ...] = ()  # config.json alone
    tokenizers: tuple[str, ...] = ()  # every file of the folder
    optional_models: tuple[str, ...] = ()  # as models, where the repository has the folder
    optional_files: tuple[str, ...] = ()


MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
# An SDXL folder in diffusers' layout, or the video release (its UNet in the original layout, a refiner).
SDXL_FOLDER = Wanted(models=MODELS, tokenizers=TOKENIZERS, optional_models=("refiner",),
                     optional_files=("model_index.json", "scheduler/scheduler_config.json"))
VIDEO_UNET = Wanted(models=("unet",))
TOKENIZER_FOLDERS = Wanted(tokenizers=TOKENIZERS)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # saved by transformers: model.safetensors
INDEX = re.compile(r"(?P<stem>.+)\.(?P<extension>safetensors|bin)\.index(?P<variant>\.fp16)?\.json")


def weight_order(weight_names: tuple[str, ...], fp16: bool) -> tuple[str, ...]:
    """The weight file names (convert_weights.WEIGHT_NAMES) in the order they are taken: full
    precision first, the fp16 variant first if `fp16`; then safetensors before pickles."""
    return tuple(sorted(weight_names, key=lambda name: ((".fp16" in name) != fp16, ".bin" in name)))


def weight_files(names: set[str], folder: str, weight_names: tuple[str, ...]) -> list[str]:
    """The first of `weight_names` that `folder` holds, with its shards if it is a shard index."""
    for weight_name in weight_names:
        path = f"{folder}/{weight_name}"
        if path not in names:
            continue
        if not (index := INDEX.fullmatch(weight_name)):
            return [path]
        shard = re.compile(re.escape(f"{folder}/{index['stem']}{index['variant'] or ''}-")
                           + r"\d+-of-\d+\." + index["extension"])
        return [path, *sorted(name for name in names if shard.fullmatch(name))]
    return []


def expected_weights(folder: str, weight_names: tuple[str, ...]) -> str:
    """The weight file that names what `folder` lacks: the first of `weight_names` its library writes."""
    stem = "model." if folder in TEXT_ENCODERS else "diffusion_pytorch_model."
    return f"{folder}/" + next((name for name in weight_names if name.startswith(stem)), weight_names[0])


def selection(names: set[str], wanted: Wanted, weight_names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(the files to fetch, the required files that `names` lacks): weight files taken in the
    order of `weight_names`."""
    files, missing = [], []
    present = [folder for folder in wanted.optional_models if any(name.startswith(f"{folder}/") for name in names)]
    for folder in (*wanted.models, *present, *wanted.configs):
        config = f"{folder}/config.json"
        (files if config in names else missing).append(config)
    for folder in (*wanted.models, *present):
        files.extend(weights := weight_files(names, folder, weight_names))
        if not weights:
            missing.append(expected_weights(folder, weight_names))
    for folder in wanted.tokenizers:
        files.extend(sorted(name for name in names if str(PurePosixPath(name).parent) == folder))
        if f"{folder}/tokenizer.json" not in names:  # else vocab.json and merges.txt make the tokenizer
            missing.extend(path for path in (f"{folder}/vocab.json", f"{folder}/merges.txt") if path not in names)
    files.extend(name for name in wanted.optional_files if name in names)
    return files, missing


def absent(folder: Path, files: list[str]) -> list[str]:
    """The files, and the shards their shard indexes name, that `folder` does not hold (a cache
    link whose blob is gone included)."""
    missing = [file for file in files if not (folder / file).is_file()]
    for index in (file for file in files if INDEX.fullmatch(PurePosixPath(file).name) and file not in missing):
        try:
            weight_map = read_json_object(folder / index).get("weight_map")
        except ValueError:
            continue  # the conversion names a broken index
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        paths = [str(PurePosixPath(index).parent / shard) for shard in sorted(shards) if isinstance(shard, str)]
        missing.extend(path for path in paths if path not in missing and not (folder / path).is_file())
    return missing


def snapshot_names(folder: Path) -> set[str]:
    """The file names of a cached snapshot, relative, "/"-separated (links to missing blobs included)."""
    return {Path(root, name).relative_to(folder).as_posix() for root, _, names in os.walk(folder) for name in names}


# 3. Fetching: the hub's listing, then snapshot_download of the selection; the cache when offline.


def unreachable(error: Exception) -> str:
    """Why the hub cannot be reached, in a few words."""
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if isinstance(error, HfHubHTTPError):
        return f"it answered HTTP {error.response.status_code}"
    return f"no network: {str(error).splitlines()[0] if str(error) else type(error).__name__}"


def fetch_online(option: str, repo_id: str, revision: str | None, siblings: list, wanted: Wanted,
                 weight_names: tuple[str, ...]) -> Path:
    """The snapshot folder holding the selection from the hub's listing `siblings`, downloaded
    where the cache lacks it."""
    files, missing = selection({sibling.rfilename for sibling in siblings}, wanted, weight_names)
    if missing:
        raise HubError(f"{option} {repository(repo_id, revision)} on the hub lacks "
                       f"{listing('files the conversion reads', missing, SHOWN)}")
    size = sum(sibling.size or 0 for sibling in siblings if sibling.rfilename in files)
    print(f"fetching {len(files)} files of {repo_id} ({size / 1e9:.2f} GB) into {constants.HF_HUB_CACHE}")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=[glob.escape(file) for file in files]))
    except (httpx2.HTTPError, OSError) as error:  # the hub's errors are OSErrors
        raise HubError(f"{option} {repo_id}: fetching failed: {str(error).splitlines()[0]}") from None
    if missing := absent(folder, files):
        raise HubError(f"{option} {repository(repo_id, revision)}: {folder} lacks "
                       f"{listing('files', missing, SHOWN)} after fetching")
    return folder


def fetch_offline(option: str, repo_id: str, revision: str | None, why: str, wanted: Wanted,
                  weight_names: tuple[str, ...]) -> Path:
    """The cached snapshot folder of the revision, if it holds the selection from its own files."""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except IncompleteSnapshotError as error:  # it lacks files of the repository: those read are checked below
        folder = Path(error.snapshot_path)
    except LocalEntryNotFoundError:  # nothing says it is a repository: perhaps a mistyped local path
        raise HubError(f"{option} {repository(repo_id, revision)}: no such local folder or file, and the hub cannot "
                       f"be reached ({why}) and the cache {constants.HF_HUB_CACHE} holds no copy of it") from None
    files, missing = selection(snapshot_names(folder), wanted, weight_names)
    if missing := missing + absent(folder, files):
        raise HubError(f"{option} {repository(repo_id, revision)}: the hub cannot be reached ({why}) and its "
                       f"cached copy {folder} lacks {listing('files', missing, SHOWN)}")
    print(f"the hub cannot be reached ({why}): using the cached copy of {repo_id}, {folder}")
    return folder


def fetch(option: str, repo_id: str, revision: str | None, wanted: Wanted, weight_names: tuple[str, ...]) -> Path:
    """The snapshot folder of hub repository `repo_id` holding the files of `wanted`, fetched into
    huggingface_hub's cache, or the cached copy when the hub cannot be reached; HubError in one
    line naming `option`, the repository and what is missing."""
    try:
        info = HfApi().repo_info(repo_id, revision=revision, files_metadata=True)
    except RevisionNotFoundError:
        raise HubError(f"--revision {revision}: the hub's {repo_id} has no such branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise HubError(f"{option} {repo_id} is no local path, and the hub has no repository {repo_id} that you "
                       "may read (a private or gated one needs `hf auth login`)") from None
    except (OfflineModeIsEnabled, httpx2.TransportError, HfHubHTTPError) as error:
        return fetch_offline(option, repo_id, revision, unreachable(error), wanted, weight_names)
    return fetch_online(option, repo_id, revision, info.siblings or [], wanted, weight_names)


def local_sources(source: str, video_unet: str | None, tokenizers: str | None, revision: str | None,
                  weight_names: tuple[str, ...], fp16: bool) -> tuple[str, str | None, str | None]:
    """convert_weights.py's SRC, --video-unet and --tokenizers as local paths: an existing path as
    it is, a hub name fetched (`revision` is SRC's; weight files in the order of `weight_names`,
    the fp16 variant first if `fp16`); HubError in one line for a value that is neither."""
    for option, value in (("SRC", source), ("--video-unet", video_unet), ("--tokenizers", tokenizers)):
        if value is not None and not Path(value).exists() and not is_repo_id(value):
            raise HubError(f"{option} {value} does not exist, and is no hub repository name (owner/name) either")
    if revision is not None and not is_hub_name(source):
        raise HubError(f"--revision is for a SRC given by its hub name; SRC {source} is a local path")
    order = weight_order(weight_names, fp16)
    if is_hub_name(source):
        wanted = SDXL_FOLDER if video_unet is None else replace(SDXL_FOLDER, models=MODELS[1:], configs=("unet",))
        source = str(fetch("SRC", source, revision, wanted, order))
    if is_hub_name(video_unet):
        video_unet = str(fetch("--video-unet", video_unet, None, VIDEO_UNET, order) / "unet")
    if is_hub_name(tokenizers):
        tokenizers = str(fetch("--tokenizers", tokenizers, None, TOKENIZER_FOLDERS, order))
    return source, video_unet, tokenizers
