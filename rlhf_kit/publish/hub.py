"""Publishing to the Hugging Face Hub: create the repository (private by default) and upload an export with its card.

    push("outputs/tiny-sft-export", "me/tiny-sft")                   # an export directory, as it is
    push("outputs/tiny-ppo", "me/tiny-ppo", formats=["merged", "gguf"])  # a stage output: exported first, then pushed
    push("outputs/tiny-ppo", "me/tiny-ppo", dry_run=True).files      # only list what would be uploaded

The token is the one huggingface_hub finds (HF_TOKEN, then the file `hf auth login` writes). It goes to the client
in memory and is never printed, logged or written; a file that contains it is refused. HF_ENDPOINT is read at each
call, so tests can point the real client at a local server.

Every training recipe calls `take_over_push(args)` right after parsing its config (which also keeps a hub_token out
of the saved arguments and switches telemetry off), and with `push_to_hub: true` pushes at the end: Trainer's own
push would upload at every save, to a public repository unless told otherwise, without rlhf-kit's card.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from rlhf_kit.config import ConfigError

logger = logging.getLogger(__name__)

REPO_ID_HELP = ("a Hub repository id is <namespace>/<name>: letters, digits, '-', '_' and '.', at most 96 "
                "characters each, not starting or ending with '-' or '.'")
TOKEN_HELP = ("log in with `hf auth login`, or set HF_TOKEN to a token with write access; dry_run lists the files "
              "without a token")
# Never uploaded: training state and caches that a stage directory may hold.
_SKIP = ("checkpoint-*", "runs", ".*", "__pycache__", "*.partial", "training_args.bin", "optimizer.pt",
         "scheduler.pt", "rng_state*", "*.lock")
_TEXT = (".json", ".yaml", ".yml", ".md", ".txt", ".jinja", ".py", ".cfg", ".toml")


class PushError(RuntimeError):
    """Pushing cannot proceed; the message says what to do."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    private: bool
    files: list[str]
    sizes: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    url: str | None = None
    commit_url: str | None = None

    def summary(self) -> str:
        head = (f"== dry run: would upload {len(self.files)} files to {self.repo_id}@{self.revision}" if self.dry_run
                else f"== pushed {len(self.files)} files to {self.commit_url or self.url}")
        visibility = "private" if self.private else "public"
        rows = [f"  {f}  ({self.sizes.get(f, 0) / 1e6:.2f} MB)" for f in self.files]
        return "\n".join([f"{head} ({visibility})", *rows])


@dataclass
class PushSettings:
    repo_id: str
    private: bool = True
    revision: str | None = None


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"hub_model_id '{repo_id}' is malformed: {REPO_ID_HELP}.") from None


def require_token() -> str:
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it (or use dry_run to list files).")
    token = get_token()
    if not token:
        raise PushError(f"No Hugging Face token found: {TOKEN_HELP}.")
    return token


def take_over_push(args) -> PushSettings | None:
    """A recipe's push settings (TrainingArguments' push_to_hub, hub_model_id, hub_private_repo, hub_revision), with
    Trainer's own push switched off. Fails now, not after training, on a missing or malformed id or a missing token.

    Whether or not it pushes, the recipe's Hub traffic is settled here too: a token among the arguments is dropped
    (Trainer pickles the arguments into every checkpoint's training_args.bin) and telemetry is switched off.
    """
    _drop_token(args)
    _no_telemetry()
    if not getattr(args, "push_to_hub", False):
        return None
    if not args.hub_model_id:
        raise ConfigError("push_to_hub: true needs hub_model_id: <namespace>/<name>.")
    check_repo_id(args.hub_model_id)
    require_token()
    args.push_to_hub = False
    return PushSettings(args.hub_model_id, private=args.hub_private_repo is not False, revision=args.hub_revision)


def _drop_token(args) -> None:
    if getattr(args, "hub_token", None):
        logger.warning("hub_token is ignored and kept out of every saved file (training_args.bin, configs, cards): "
                       "set HF_TOKEN or run `hf auth login` instead. The pipeline hands a hub_token override to the "
                       "stage as HF_TOKEN.")
        args.hub_token = None


def _no_telemetry() -> None:
    """No usage pings: TRL's trainers send one per run (trl 1.16, `_BaseTrainer._send_telemetry`) unless telemetry or
    offline mode is set, so a run on local files would still reach the Hub. An explicit HF_HUB_DISABLE_TELEMETRY in
    the environment is left to decide."""
    from huggingface_hub import constants

    if "HF_HUB_DISABLE_TELEMETRY" not in os.environ:
        constants.HF_HUB_DISABLE_TELEMETRY = True


def upload_plan(folder: str | Path) -> list[str]:
    """The files of `folder` to upload, as repository paths, sorted."""
    folder = Path(folder)
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(fnmatch(part, pattern) for part in rel.parts for pattern in _SKIP):
            files.append(rel.as_posix())
    return sorted(files)


def push(path: str | Path, repo_id: str, *, formats: list[str] | None = None, gguf_types: list[str] | None = None,
         base_model_id: str | None = None, private: bool = True, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False) -> PushResult:
    """Push an export directory as it is, or a stage output after exporting `formats` of it to a temporary directory
    (default: the adapter of an adapter stage, the model of a full one)."""
    from rlhf_kit.publish.export import EXPORT_CONFIG, ExportArguments, export, read_stage_output

    path = Path(path)
    check_repo_id(repo_id)
    if (path / EXPORT_CONFIG).is_file():
        if formats or gguf_types or base_model_id:
            raise ConfigError(f"{path} is already an export; formats / gguf_types / base_model_id apply to a stage "
                              "output. Push the stage output, or export it again with those settings.")
        return push_folder(path, repo_id, private=private, revision=revision, commit_message=commit_message,
                           dry_run=dry_run)
    source = read_stage_output(path)  # or the error that says what this directory is not
    if not dry_run:
        require_token()  # before minutes of merging
    formats = formats or (["adapter"] if source.adapter else ["merged"])
    with tempfile.TemporaryDirectory(prefix="rlhf-kit-push-") as tmp:
        out = Path(tmp) / (path.resolve().name or "export")
        export(ExportArguments(model_path=str(path), output_dir=str(out), formats=formats,
                               gguf_types=gguf_types or ["f16", "q8_0"], base_model_id=base_model_id,
                               model_name=path.resolve().name, hub_model_id=repo_id))
        return push_folder(out, repo_id, private=private, revision=revision, commit_message=commit_message,
                           dry_run=dry_run)


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
                commit_message: str | None = None, dry_run: bool = False) -> PushResult:
    """Upload every file of `folder` (see `upload_plan`) in one commit, creating the repository and the branch."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from rlhf_kit.publish.model_card import render_card
    from rlhf_kit.runs import STAGE_FILE

    folder = Path(folder)
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: export a stage first (rlhf-kit export).")
    files = upload_plan(folder)
    # The card is rendered again for this repository, so its snippets load from the Hub id.
    card = render_card(folder, repo_id=repo_id).encode() if (folder / STAGE_FILE).is_file() else None
    if card is not None and "README.md" not in files:
        files = sorted([*files, "README.md"])
    if "README.md" not in files:
        raise PushError(f"{folder} has no README.md model card; export it with `rlhf-kit export`, which writes one.")
    sizes = {f: len(card) if f == "README.md" and card else (folder / f).stat().st_size for f in files}
    result = PushResult(repo_id, revision or "main", private, files, sizes, dry_run=dry_run)
    if dry_run:
        return result

    token = require_token()
    _refuse_token_in(folder, files, token, card)
    api = HfApi(endpoint=(os.environ.get("HF_ENDPOINT") or _default_endpoint()).rstrip("/"), token=token)
    try:
        user = api.whoami()["name"]
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise PushError(f"{api.endpoint} rejected the Hugging Face token (HTTP {status}): {TOKEN_HELP}.") from None
    if "/" not in repo_id:
        repo_id = result.repo_id = f"{user}/{repo_id}"
    result.url = str(api.create_repo(repo_id, private=private, exist_ok=True))
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=card if f == "README.md" and card else
                                     str(folder / f)) for f in files]
    info = api.create_commit(repo_id, operations, revision=revision,
                             commit_message=commit_message or f"Upload {folder.resolve().name} with rlhf-kit")
    result.commit_url = info.commit_url
    logger.info("pushed %d files to %s@%s", len(files), repo_id, result.revision)
    return result


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _refuse_token_in(folder: Path, files: list[str], token: str, card: bytes | None) -> None:
    """A config or card that somehow captured the token must not be published with it."""
    for name in files:
        path = folder / name
        text = card if name == "README.md" and card else None
        if text is None and path.suffix in _TEXT and path.stat().st_size < 50_000_000:
            text = path.read_bytes()
        if text is not None and token.encode() in text:
            raise PushError(f"{path} contains your Hugging Face token; remove it from that file before pushing.")


def publish_stage(output_dir: str | Path, settings: PushSettings | None) -> None:
    """A finished stage's output gets its lineage model card; with `push_to_hub: true` it is pushed as well."""
    from rlhf_kit.publish.model_card import write_card

    write_card(output_dir, repo_id=settings.repo_id if settings else None)
    if settings is not None:
        push(output_dir, settings.repo_id, private=settings.private, revision=settings.revision)
