"""Publishing to the Hugging Face Hub: create the repository (private by default) and upload an export with its card.

    push("outputs/tiny-sft-export", "me/tiny-sft")                   # an export directory, as it is
    push("outputs/tiny-ppo", "me/tiny-ppo", formats=["merged", "gguf"])  # a stage output: exported first, then pushed
    push("outputs/tiny-ppo", "me/tiny-ppo", dry_run=True).files      # only list what would be uploaded

The directory is read once (`runs.StageOutput`) and uploaded in one commit by `HfApi.upload_folder`, never the
training state a stage directory holds (`runs.NOT_PUBLISHED`). Its README.md becomes the card rendered for the
repository (load snippets name the Hub id), so after a push the directory matches what the repository holds.

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
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

from rlhf_kit.config import ConfigError
from rlhf_kit.errors import UserError
from rlhf_kit.publish.export import ExportArguments, check_repo_id, check_stage_output, export
from rlhf_kit.publish.model_card import render_card, write_card
from rlhf_kit.runs import CARD_FILE, StageOutput, unpublished_patterns

logger = logging.getLogger(__name__)

TOKEN_HELP = ("log in with `hf auth login`, or set HF_TOKEN to a token with write access; dry_run lists the files "
              "without a token")
_TEXT = (".json", ".yaml", ".yml", ".md", ".txt", ".jinja", ".py", ".cfg", ".toml")


class PushError(UserError, RuntimeError):
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


def require_token() -> str:
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
    if "HF_HUB_DISABLE_TELEMETRY" not in os.environ:
        constants.HF_HUB_DISABLE_TELEMETRY = True


def upload_plan(folder: str | Path) -> list[str]:
    """The files of `folder` to upload, as repository paths, sorted (a stage's training state is never among them:
    runs.NOT_PUBLISHED)."""
    return sorted(StageOutput.read(folder).files)


def push(path: str | Path, repo_id: str, *, formats: list[str] | None = None, gguf_types: list[str] | None = None,
         base_model_id: str | None = None, private: bool = True, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False) -> PushResult:
    """Push an export directory as it is, or a stage output after exporting `formats` of it to a temporary directory
    (default: the adapter of an adapter stage, the model of a full one)."""
    return push_output(StageOutput.read(path), repo_id, formats=formats, gguf_types=gguf_types,
                       base_model_id=base_model_id, private=private, revision=revision,
                       commit_message=commit_message, dry_run=dry_run)


def push_output(output: StageOutput, repo_id: str, *, formats: list[str] | None = None,
                gguf_types: list[str] | None = None, base_model_id: str | None = None, private: bool = True,
                revision: str | None = None, commit_message: str | None = None, dry_run: bool = False) -> PushResult:
    """`push` of a directory already read."""
    check_repo_id(repo_id)
    if output.is_export:
        if formats or gguf_types or base_model_id:
            raise ConfigError(f"{output.path} is already an export; formats / gguf_types / base_model_id apply to a "
                              "stage output. Push the stage output, or export it again with those settings.")
        return _upload(output, repo_id, private=private, revision=revision, commit_message=commit_message,
                       dry_run=dry_run)
    source = check_stage_output(output)  # or the error that says what this directory is not
    if not dry_run:
        require_token()  # before minutes of merging
    formats = formats or (["adapter"] if source.adapter else ["merged"])
    name = output.path.resolve().name
    with tempfile.TemporaryDirectory(prefix="rlhf-kit-push-") as tmp:
        out = Path(tmp) / (name or "export")
        export(ExportArguments(model_path=str(output.path), output_dir=str(out), formats=formats,
                               gguf_types=gguf_types or ["f16", "q8_0"], base_model_id=base_model_id,
                               model_name=name, hub_model_id=repo_id), output)
        return _upload(StageOutput.read(out), repo_id, private=private, revision=revision,
                       commit_message=commit_message, dry_run=dry_run)


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
                commit_message: str | None = None, dry_run: bool = False) -> PushResult:
    """Upload every file of `folder` (see `upload_plan`) in one commit, creating the repository and the branch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: export a stage first (rlhf-kit export).")
    return _upload(StageOutput.read(folder), repo_id, private=private, revision=revision,
                   commit_message=commit_message, dry_run=dry_run)


def _upload(output: StageOutput, repo_id: str, *, private: bool, revision: str | None, commit_message: str | None,
            dry_run: bool) -> PushResult:
    check_repo_id(repo_id)
    # The card is rendered again for this repository, so its snippets load from the Hub id. It replaces the folder's
    # README.md before the upload: the folder is then a copy of the repository.
    card = render_card(output, repo_id=repo_id).encode() if output.record is not None else None
    files = sorted({*output.files, CARD_FILE} if card is not None else output.files)
    if CARD_FILE not in files:
        raise PushError(f"{output.path} has no {CARD_FILE} model card; export it with `rlhf-kit export`, which "
                        "writes one.")
    sizes = {**output.files, **({CARD_FILE: len(card)} if card is not None else {})}
    result = PushResult(repo_id, revision or "main", private, files, sizes, dry_run=dry_run)
    if dry_run:
        return result

    token = require_token()
    _refuse_token_in(output, files, token, card)
    api = HfApi(endpoint=(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"), token=token)
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
    card_file = output.path / CARD_FILE
    if card is not None and (not card_file.is_file() or card_file.read_bytes() != card):
        card_file.write_bytes(card)
    # upload_folder lists the folder again and applies the same patterns (with huggingface_hub's filter_repo_objects,
    # which StageOutput used for `files`), so what goes up is `files`.
    info = api.upload_folder(repo_id=repo_id, folder_path=output.path, revision=revision,
                             ignore_patterns=unpublished_patterns(),
                             commit_message=commit_message or f"Upload {output.path.resolve().name} with rlhf-kit")
    result.commit_url = info.commit_url
    logger.info("pushed %d files to %s@%s", len(files), repo_id, result.revision)
    return result


def _refuse_token_in(output: StageOutput, files: list[str], token: str, card: bytes | None) -> None:
    """A config or card that somehow captured the token must not be published with it."""
    for name in files:
        path = output.path / name
        text = card if name == CARD_FILE and card is not None else None
        if text is None and path.suffix in _TEXT and output.files[name] < 50_000_000:
            text = path.read_bytes()
        if text is not None and token.encode() in text:
            raise PushError(f"{path} contains your Hugging Face token; remove it from that file before pushing.")


def publish_stage(output_dir: str | Path, settings: PushSettings | None) -> None:
    """A finished stage's output gets its lineage model card; with `push_to_hub: true` it is pushed as well."""
    output = StageOutput.read(output_dir)
    write_card(output, repo_id=settings.repo_id if settings else None)
    if settings is not None:
        push_output(output, settings.repo_id, private=settings.private, revision=settings.revision)
