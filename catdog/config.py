"""Job configuration: one pydantic model, loaded from YAML plus ``--set key=value`` overrides.

Every job (train, predict, evaluate) reads the same file, so a run folder's ``config.yaml``
reproduces all of them.  Errors are turned into a single line that names the file and the
dotted key, because a pydantic traceback tells a user nothing about which line to fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ARCHITECTURES = ("mobilenet_v2", "resnet18", "sequential_cnn")
Architecture = Literal["mobilenet_v2", "resnet18", "sequential_cnn"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line a user should see."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    root: str = "runs"
    endpoint_url: str | None = None
    region: str | None = None


class DataConfig(_Section):
    train: str = "../shared/data/dogs-vs-cats/train"
    test: str = "../shared/data/dogs-vs-cats/test1"
    image_size: PositiveInt = 128
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    limit: PositiveInt | None = None
    # Images decoded per Ray Data task; large batches amortise per-task overhead.
    decode_batch_size: PositiveInt = 64
    # Threads per decode task; each task reserves as many CPUs.  Where decode is the bottleneck
    # (GPU predict, small machines), 2 threads over 512-1024 images per task beat more
    # single-threaded tasks (bench/NOTES.md).
    decode_threads: PositiveInt = 1


class ModelSpec(_Section):
    """One architecture to train, with optional per-architecture overrides of ``train``."""

    arch: Architecture
    image_size: PositiveInt | None = None
    epochs: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    lr: PositiveFloat | None = None
    init: str | None = None
    # Progressive resizing: the first ``early_epochs`` train on images downscaled to
    # ``early_image_size`` on the worker (cheaper steps); the last epochs and every validation
    # run at ``image_size``, so the model ends calibrated at the size predict uses.
    early_image_size: PositiveInt | None = None
    early_epochs: int = Field(0, ge=0)
    # With train.time_budget_minutes: this architecture's share of the training time (unset = 1,
    # shares are normalised), and the fraction of its planned epochs at ``early_image_size``.
    budget_share: PositiveFloat | None = None
    early_fraction: float | None = Field(None, ge=0, lt=1)
    # With train.time_budget_minutes: where fewer than ``min_epochs`` epochs fit at the sizes above,
    # the plan tries each of ``smaller_sizes`` in turn, [early_image_size, image_size] each ([image_size]
    # without progressive resizing), and trains at the first where they fit, else where the most fit.
    # Where few epochs fit, smaller images pay: 4 epochs of ResNet18 at 96>128 px scored 0.854, 9 at
    # 64>96 0.895 and 15 at 48>64 0.899-0.902, in the same budget on one CPU (bench/NOTES.md).  The sizes
    # chosen are the model's: validation, checkpoint, predict and the settings fingerprint use them,
    # and a rerun keeps them (plan.json).
    smaller_sizes: list[list[PositiveInt]] = []
    min_epochs: PositiveInt | None = None
    # Overrides train.amp for this architecture: bf16's gain depends on the model (MobileNetV2's
    # depthwise convolutions gain little; bench/NOTES.md, "Model compute").
    amp: bool | None = None


class TrainConfig(_Section):
    epochs: PositiveInt = 3
    # Wall-clock minutes for the whole train job (training, validation study, report).  Set, it
    # replaces the epoch counts: the job measures this machine's step speed, sizes every
    # architecture's epochs to fit, and re-plans from the real pace after every epoch.
    time_budget_minutes: PositiveFloat | None = None
    batch_size: PositiveInt = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 2e-3
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Exponential moving average of the weights, updated after every step with this decay (warm-up:
    # min(decay, (1 + t) / (10 + t)) at update t): an average over the last ~1/(1 - decay) steps often
    # validates better than the last step's weights.  Costs a copy of the model and one more validation
    # pass per epoch, which scores both and checkpoints the better, saying which (meta.json "weights").
    # Unset: off.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Smallest area fraction the random resized crop keeps; lower means stronger augmentation.
    crop_scale_min: float = Field(0.35, gt=0, le=1)
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    # Autocast where the hardware runs it natively: bf16 on GPUs of compute capability >= 8.0 and on
    # CPUs with AMX or AVX512-BF16; fp16 with a checkpointed loss scaler on older GPUs; else fp32.
    # Under train.time_budget_minutes a CPU run times both bf16 and fp32 steps first and trains each
    # architecture in the faster (AVX512-BF16 without AMX can be slower in bf16); so does a fixed-epoch
    # run on a CPU with bf16 instructions, in its Train worker (2-3 s), unless measure_amp is off.
    amp: bool = True
    # false: a fixed-epoch run takes bf16 wherever the CPU has the instructions (the benchmarks'
    # bf16-against-bf16 rows).  A budgeted run always measures.
    measure_amp: bool = True
    cpus_per_worker: PositiveFloat = 1
    max_failures: int = Field(2, ge=-1)
    init: str = "scratch"
    freeze_backbone_epochs: int = Field(0, ge=0)
    backbone_lr_mult: float = Field(0.1, gt=0, le=1)
    keep_checkpoints: PositiveInt = 2
    torch_threads: PositiveInt | None = None
    # After training: score the validation split (val_study.json) and write report.html; predict and
    # evaluate refresh the report.  Off skips all of it (tests that look at neither run faster).
    report: bool = True
    # Test-time image sizes the validation study tries, as multiples of each model's training size
    # (rounded to 8 px): it keeps, per model, the one with the lowest validation log loss in predict's
    # default mode (predict.tta), fits its temperatures there, and records both in the checkpoint's
    # meta.json ("test_time"), which predict and evaluate use.  A model trained on random-resized crops
    # often scores better on larger images than it trained at (FixRes).  Each factor f costs the
    # study a pass of about 2 f^2 forward passes per validation image, which the time budget counts.
    test_size_factors: list[PositiveFloat] = Field([1.0], min_length=1)


class PredictConfig(_Section):
    batch_size: PositiveInt = 64
    concurrency: PositiveInt = 1
    threshold: float = Field(0.5, gt=0, lt=1)
    unreadable_label: Literal[0, 1] = 1
    num_gpus: float = Field(0, ge=0)
    cpus_per_actor: PositiveFloat = 1
    # Intra-op threads per predictor actor.  Ray caps an actor at its CPU count (1) by default;
    # on a small machine one actor with every core beats several single-thread actors.
    torch_threads: PositiveInt | None = None
    # Autocast for predict, evaluate and the end-of-train validation study (the per-epoch validation
    # during training follows train.amp): bf16 on Ampere+ GPUs, fp16 on older ones; on a CPU with bf16
    # instructions, see measure_amp.
    amp: bool = True
    # On such a CPU each predictor actor first times its models in bf16 and in fp32 (about a second)
    # and scores in the faster: AVX512-BF16 without AMX scored ResNet18 at 0.7x fp32, AMX at about 2x.
    # false: bf16 wherever the CPU has the instructions (benchmarks comparing bf16 with bf16).
    measure_amp: bool = True
    # Flip test-time augmentation: each image scored as is and mirrored, probabilities averaged.
    # Twice the model compute; predict and evaluate's --tta / --no-tta override it.
    tta: bool = False
    # Score with each BatchNorm folded into the convolution before it (predict, evaluate and the
    # validation study; training's own validation scores the model as it trains).  The same function
    # to within float rounding, fewer ops: on 2 cores in fp32, ResNet18 1.15x as fast at 128 px (no
    # gain at 64) and MobileNetV2 1.27-1.90x (bench/NOTES.md, "Folding BatchNorm for scoring").
    fold_batchnorm: bool = True


class RayConfig(_Section):
    # Logical CPUs of an embedded local Ray.  More than the physical cores on purpose:
    # Train workers hold their CPUs for the whole run and Ray Data needs slots left over.
    num_cpus: PositiveInt | None = None
    object_store_memory_mb: PositiveInt | None = None
    # Start Ray's dashboard with an embedded Ray (a cluster, RAY_ADDRESS, keeps its own).  Unset: the
    # train job only.  Ray Train's placement-group cleaner needs the State API the dashboard serves
    # (without it a dead controller's resources are never released, and it warns every second);
    # predict, evaluate and prepare run Ray Data alone, where the dashboard cost a 500-image predict
    # job 31% more CPU and 15% more wall time on 2 cores (bench/NOTES.md, "Embedded Ray").  true /
    # false: every job.
    dashboard: bool | None = None


class TrackingConfig(_Section):
    # Any MLflow tracking URI: sqlite:///mlflow.db, http://host:5000, a folder; unset = no tracking.
    mlflow_uri: str | None = None
    # MLflow experiment; unset = run_name.
    experiment: str | None = None


class CatdogConfig(_Section):
    run_name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(arch="resnet18")], min_length=1)
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("models", mode="before")
    @classmethod
    def _arch_names_as_specs(cls, value: Any) -> Any:
        # ``models: [resnet18, mobilenet_v2]`` is the common case; a mapping adds overrides.
        if isinstance(value, list):
            return [{"arch": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check_models(self) -> CatdogConfig:
        seen = set()
        for index, spec in enumerate(self.models):
            if spec.arch in seen:
                raise ValueError(f"models.{index}: architecture {spec.arch!r} is listed twice")
            seen.add(spec.arch)
            if spec.arch == "sequential_cnn" and self.init_for(spec) == "imagenet":
                raise ValueError(
                    f"models.{index}: sequential_cnn has no ImageNet weights; use init: scratch or a checkpoint path"
                )
            self._check_progressive(index, spec)
        return self

    def _check_progressive(self, index: int, spec: ModelSpec) -> None:
        if self.train.time_budget_minutes is not None:
            self._check_budgeted(index, spec)
            return
        for key in ("budget_share", "early_fraction", "min_epochs", "smaller_sizes"):
            if getattr(spec, key) not in (None, []):
                raise ValueError(f"models.{index}.{key}: only applies with train.time_budget_minutes")
        if not spec.early_epochs:
            return
        size, epochs = self.image_size_for(spec), spec.epochs or self.train.epochs
        if spec.early_image_size is None or spec.early_image_size >= size:
            raise ValueError(
                f"models.{index}.early_image_size: needs a size below image_size ({size}) when early_epochs is set"
            )
        if spec.early_epochs >= epochs:
            raise ValueError(
                f"models.{index}.early_epochs: must be fewer than the architecture's epochs ({epochs}), "
                "so that the last epochs train at image_size"
            )

    def _check_budgeted(self, index: int, spec: ModelSpec) -> None:
        """Under a time budget the plan sizes the epochs: fixed counts would contradict it."""
        for key in ("epochs", "early_epochs"):
            if getattr(spec, key):
                raise ValueError(
                    f"models.{index}.{key}: train.time_budget_minutes sizes the epochs; "
                    "set early_fraction instead, or drop the budget"
                )
        size = self.image_size_for(spec)
        if (spec.early_image_size is None) != (spec.early_fraction is None):
            raise ValueError(f"models.{index}: early_image_size and early_fraction go together under a time budget")
        if spec.early_image_size is not None and spec.early_image_size >= size:
            raise ValueError(f"models.{index}.early_image_size: needs a size below image_size ({size})")
        self._check_smaller_sizes(index, spec, size)

    def _check_smaller_sizes(self, index: int, spec: ModelSpec, size: int) -> None:
        if bool(spec.smaller_sizes) != (spec.min_epochs is not None):
            raise ValueError(f"models.{index}: smaller_sizes and min_epochs go together")
        shape = "[early_image_size, image_size]" if spec.early_image_size else "[image_size]"
        for rung, sizes in enumerate(spec.smaller_sizes):
            where = f"models.{index}.smaller_sizes.{rung}"
            if len(sizes) != (2 if spec.early_image_size else 1):
                raise ValueError(f"{where}: expected {shape}, as the sizes above it (got {sizes})")
            if sizes[-1] >= size:
                raise ValueError(f"{where}: image_size {sizes[-1]} must be below the size before it ({size})")
            if len(sizes) == 2 and sizes[0] >= sizes[1]:
                raise ValueError(f"{where}: early_image_size {sizes[0]} must be below its image_size {sizes[1]}")
            size = sizes[-1]

    def image_size_for(self, spec: ModelSpec) -> int:
        return spec.image_size or self.data.image_size

    def init_for(self, spec: ModelSpec) -> str:
        return spec.init or self.train.init

    @property
    def run_uri(self) -> str:
        return self.storage.root.rstrip("/") + "/" + self.run_name

    def hash(self) -> str:
        """Short, stable digest of the resolved config, stored in every checkpoint."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    container: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(container, list):
            if not part.isdigit() or int(part) >= len(container):
                where = ".".join(parts[:depth])
                raise ConfigError(f"{source}: --set {dotted}: {where} has no item {part!r}")
            key: Any = int(part)
            if not last and isinstance(container[key], str):
                container[key] = {"arch": container[key]}
        elif isinstance(container, dict):
            key = part
            if not last and container.get(key) is None:
                container[key] = {}
        else:
            raise ConfigError(f"{source}: --set {dotted}: {'.'.join(parts[:depth])} is not a section")
        if last:
            container[key] = value
        else:
            container = container[key]


def parse_override(text: str, source: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: --set {text!r}: expected key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def split_overrides(text: str) -> list[str]:
    """``key=value`` items of a space-separated list (the Makefile's ``SET``); spaces inside
    ``[...]``, ``{...}`` or quotes do not split, so ``models=[resnet18, mobilenet_v2]`` stays one."""
    items, current, depth, quote = [], "", 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char.isspace() and depth == 0:
            items, current = items + [current] if current else items, ""
            continue
        current += char
    return items + [current] if current else items


def make_job_sets(data_dir: str, overrides: str) -> list[str]:
    """The ``--set`` arguments the Makefile passes to every job: the data folders, then ``SET``."""
    pairs = [f"data.train={data_dir}/train", f"data.test={data_dir}/test1", *split_overrides(overrides)]
    return [arg for pair in pairs for arg in ("--set", pair)]


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "<top level>"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required key is missing"
    got = error.get("input")
    got_text = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    message = error["msg"]
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
        # Model-level checks name their own key.
        if not error["loc"]:
            return message
    if kind == "literal_error":
        message = message.replace("Input should be", "expected")
    return f"{key}: {message}{got_text}"


def validate_config(raw: Any, source: str) -> CatdogConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return CatdogConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{source}: {_describe(first)}{more}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CatdogConfig:
    """Read ``path`` and apply ``key=value`` overrides; raise ConfigError with a one-line message."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    for item in overrides:
        key, value = parse_override(item, source)
        _set_dotted(raw, key, value, source)
    return validate_config(raw, source)


if __name__ == "__main__":  # the Makefile: python -m catdog.config DATA_DIR SET  →  NUL-separated job arguments
    import sys

    sys.stdout.write("".join(arg + "\0" for arg in make_job_sets(sys.argv[1], sys.argv[2])))
