"""`saekit sweep`: a grid of SAEs trained on one activation cache, their results and Pareto frontiers.

The grid is architectures × sparsity settings × widths. ``--grid NAME=V1,V2`` sweeps the config field NAME
(``l1`` and ``l0`` are aliases of ``l1_coeff`` and ``target_l0``, as in ``saekit train``) for every
architecture whose config has that field; several ``--grid`` axes are crossed; an architecture with none
of the grid's fields runs once with its defaults. Each width is ``expansion × width factor × d_in``, where
``--width-factor relu=1.5`` makes one architecture wider than the rest for comparisons at equal compute
(the Gated SAE paper's ReLU baseline is 1.5× wider).

Each point is an ordinary ``saekit train`` job (:func:`saekit.train_job.run_train_job`) in
``OUT/runs/NAME``, NAME being built from the point's settings, so the same sweep always maps a point to
the same folder. The job's own evaluation (held-out tokens of the cache's text, CE loss recovered unless
``--no-splice``) gives the results, written to ``OUT/results.csv`` and ``OUT/results.json``, and two plots:
L0 against FVU and L0 against CE loss recovered, one curve per architecture with its Pareto frontier (the
points no other point of the same architecture beats at an equal or lower L0) drawn bold.

Points are trained together from one pass over the cache (:func:`saekit.train_job.run_train_jobs`, up to
``--per-pass`` at a time): each batch is read once and handed to every SAE, each still with its own
optimizer, schedule, run folder and checkpoint, and each ending bit for bit as if trained alone. Points
that cannot share a pass (multi-layer SAEs, SAEs on their own rows) and a lone unfinished point run as
ordinary ``saekit train`` jobs.

Resuming: a point whose ``summary.json`` exists and whose ``run_config.json`` equals the job it would run
is read back, not retrained; any other point is handed to the job, which resumes its trainer checkpoint.

saekit's choices: activations are read and evaluated as they were cached (the cache's model, text,
context length and special-token/outlier exclusion); every point's settings are checked before the first
one trains; runs share the training settings (``saekit train``'s defaults and options).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from saekit.config import add_dataclass_args, dataclass_from_args, field_docs, option_name
from saekit.jobs import EvalConfig, ExtractConfig
from saekit.train_job import DEFAULT_TOKENS, DEFAULT_TRAIN, TrainJob, run_train_job, run_train_jobs

ALIASES = {"l1": "l1_coeff", "l0": "target_l0"}
"""Short grid names, the same as ``saekit train``'s option aliases."""
NOT_GRIDDED = {"d_in": "it is the cache's width", "width": "widths come from --expansions"}
RESULT_COLUMNS = (
    "name", "arch", "options", "expansion", "width_factor", "width", "l0", "fvu", "ce_loss_recovered",
    "dead_fraction", "train_seconds", "run",
)  # fmt: skip
PLOTS = {
    "fvu": ("pareto_fvu.png", "FVU", False),
    "ce_loss_recovered": ("pareto_ce.png", "CE loss recovered", True),
}
"""Result key → (file, axis label, higher is better)."""


@dataclass
class SweepConfig:
    """A grid of training runs on one activation cache."""

    cache: str
    """Activation cache (made by `saekit cache`) every run trains on."""
    out: str
    """Sweep folder: runs/NAME per point, results.csv, results.json and the Pareto plots."""
    archs: list[str] = field(default_factory=lambda: ["topk"])
    """Architectures to train."""
    grid: list[str] = field(default_factory=list)
    """NAME=V1,V2,...: sweep config field NAME (aliases l1, l0) of every architecture that has it."""
    expansions: list[float] = field(default_factory=lambda: [8.0])
    """Widths, as multiples of the activation width d_in."""
    width_factor: list[str] = field(default_factory=list)
    """ARCH=F: train ARCH F times wider than the others (equal-compute comparisons, e.g. relu=1.5)."""
    tokens: int = DEFAULT_TOKENS
    """Training tokens per run."""
    hook: str = ""
    """Hook point to train on, when the cache holds several (multi-layer SAEs: default all of them)."""
    train: dict[str, Any] = field(default_factory=dict)
    """Training settings (TrainConfig fields) shared by every run, over `saekit train`'s defaults."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation of every run."""
    per_pass: int = 0
    """Runs trained together from one pass over the cache (0 = every run that can; 1 = one at a time)."""

    def validate(self) -> None:
        from saekit.sae import get_architecture

        if not self.archs or len(set(self.archs)) != len(self.archs):
            raise ValueError(f"--archs must name architectures, without repeats; got {self.archs}")
        for arch in self.archs:
            get_architecture(arch)  # an unknown name is an error listing the valid ones
        if not self.expansions or len(set(self.expansions)) != len(self.expansions):
            raise ValueError(f"--expansions must be given, without repeats; got {self.expansions}")
        if any(e <= 0 for e in self.expansions):
            raise ValueError(f"--expansions must be positive, got {self.expansions}")
        if self.tokens <= 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        if self.per_pass < 0:
            raise ValueError(f"--per-pass must be >= 0 (0 = all together), got {self.per_pass}")
        parse_width_factors(self.width_factor, self.archs)
        plan_sweep(self)  # every grid axis parses and applies to some architecture


@dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep."""

    arch: str
    options: tuple[tuple[str, Any], ...]
    """(config field, value) for the grid axes this architecture has, in the order of the --grid options."""
    expansion: float
    width_factor: float = 1.0

    @property
    def name(self) -> str:
        """The run folder's name: the same settings always give the same name."""
        parts = [self.arch, *(f"{k}{_fmt(v)}" for k, v in self.options), f"x{_fmt(self.run_expansion)}"]
        return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(parts))

    @property
    def run_expansion(self) -> float:
        """The expansion the run trains at: the sweep's expansion times this architecture's width factor."""
        return self.expansion * self.width_factor


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


# -- the grid --------------------------------------------------------------------------------------------
def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["k=16,32", "l1=1,2"]`` → ``{"k": ["16", "32"], "l1_coeff": ["1", "2"]}`` (aliases resolved, values
    still text: each architecture converts them to its own field's type)."""
    axes: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values_text = spec.partition("=")
        name = name.strip().replace("-", "_")
        values = [v.strip() for v in values_text.split(",")]
        if not sep or not name or not all(values):
            raise ValueError(f"--grid expects NAME=V1,V2,... (e.g. k=16,32,64), got {spec!r}")
        name = ALIASES.get(name, name)
        if name in NOT_GRIDDED:
            raise ValueError(f"--grid cannot sweep {name}: {NOT_GRIDDED[name]}")
        if name in axes:
            raise ValueError(f"--grid names {name} twice; give all its values in one NAME=V1,V2,... option")
        axes[name] = values
    return axes


def parse_width_factors(specs: list[str], archs: list[str]) -> dict[str, float]:
    """``["relu=1.5"]`` → ``{"relu": 1.5}``; every architecture not named keeps factor 1."""
    factors: dict[str, float] = {}
    for spec in specs:
        arch, sep, text = spec.partition("=")
        try:
            factor = float(text)
        except ValueError:
            factor = float("nan")
        if not sep or not factor > 0:
            raise ValueError(f"--width-factor expects ARCH=F with F > 0 (e.g. relu=1.5), got {spec!r}")
        if arch not in archs:
            raise ValueError(f"--width-factor {spec!r}: {arch!r} is not one of the sweep's --archs {archs}")
        if arch in factors:
            raise ValueError(f"--width-factor gives {arch} twice")
        factors[arch] = factor
    return factors


def plan_sweep(cfg: SweepConfig) -> list[SweepPoint]:
    """Every point of the grid, architecture by architecture, in the order the options give them."""
    from saekit.sae import get_architecture

    axes = parse_grid(cfg.grid)
    factors = parse_width_factors(cfg.width_factor, cfg.archs)
    fields = {a: {f.name for f in dataclasses.fields(get_architecture(a).config_class)} for a in cfg.archs}
    for name in axes:
        if not any(name in fields[a] for a in cfg.archs):
            raise ValueError(f"--grid {name}: none of the architectures {cfg.archs} has an option {name!r}")
    points = []
    for arch in cfg.archs:
        config_class = get_architecture(arch).config_class
        mine = {n: _convert_values(config_class, arch, n, vs) for n, vs in axes.items() if n in fields[arch]}
        for values in itertools.product(*mine.values()):
            for expansion in cfg.expansions:
                options = tuple(zip(mine, values, strict=True))
                points.append(SweepPoint(arch, options, expansion, factors.get(arch, 1.0)))
    return points


def _convert_values(config_class: type, arch: str, name: str, texts: list[str]) -> list[Any]:
    """The grid's text values as the type of ``arch``'s config field ``name``; repeats are an error."""
    values = [_convert(config_class, arch, name, t) for t in texts]
    if len(set(values)) != len(values):
        raise ValueError(f"--grid {name} repeats a value: {texts}")
    return values


def _convert(config_class: type, arch: str, name: str, text: str) -> Any:
    tp = typing.get_type_hints(config_class)[name]
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = len(args) < len(typing.get_args(tp)), args[0] if len(args) == 1 else tp
    if optional and text.lower() == "none":
        return None
    if typing.get_origin(tp) is Literal:
        choices = {str(c): c for c in typing.get_args(tp)}
        if text not in choices:
            raise ValueError(f"--grid {name}: {text!r} is not one of {arch}'s choices {list(choices)}")
        return choices[text]
    if tp is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            pass
    raise ValueError(f"--grid {name}: {text!r} is not a valid value of {arch}'s {name} ({tp})")


# -- running ---------------------------------------------------------------------------------------------
def run_sweep(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Train (or read back) every point, then write the results and plots; returns the result rows."""
    from saekit.activations import open_cache
    from saekit.sae import get_architecture

    cfg.validate()
    out, cache_dir = Path(cfg.out), str(Path(cfg.cache).resolve())
    cache = open_cache(cache_dir)
    points = plan_sweep(cfg)
    jobs = [_job(cfg, point, cache, cache_dir, out) for point in points]
    for point, job in zip(points, jobs, strict=True):  # bad settings fail here, before any training
        arch_cls = get_architecture(point.arch)
        if not arch_cls.multi_hook and arch_cls.own_training_rows(job.sae) is None:
            d_in = cache.widths[job.extract.hook[0]]
            arch_cls.config_class.from_dict(
                {"d_in": d_in, "width": int(round(job.expansion * d_in)), **job.sae}
            )
    print(f"saekit sweep: {len(points)} runs on {cache_dir} into {out}", flush=True)
    n = len(points)
    rows: list[dict[str, Any] | None] = [None] * n
    todo = []
    for i, (point, job) in enumerate(zip(points, jobs, strict=True)):
        if _finished(Path(job.out), job):
            print(f"[{i + 1}/{n}] {point.name}: finished before, read back", flush=True)
            rows[i] = _result_row(
                point, json.loads((Path(job.out) / "summary.json").read_text()), Path(job.out)
            )
        else:
            todo.append(i)
    for group in _passes(todo, points, cfg.per_pass):
        if len(group) == 1:
            print(f"[{group[0] + 1}/{n}] {points[group[0]].name}", flush=True)
            summaries = [run_train_job(jobs[group[0]])]
        else:
            print(f"[{', '.join(str(i + 1) for i in group)}/{n}] from one pass over the cache", flush=True)
            summaries = run_train_jobs([jobs[i] for i in group])
        for i, summary in zip(group, summaries, strict=True):
            rows[i] = _result_row(points[i], summary, Path(jobs[i].out))
    done = [r for r in rows if r is not None]
    write_results(done, out)
    return done


def _passes(todo: list[int], points: list[SweepPoint], per_pass: int) -> list[list[int]]:
    """The unfinished points in groups trained from one pass each: those reading one hook point's
    activations together (at most ``per_pass`` a group; 0 = no limit), every other point alone."""
    from saekit.sae import get_architecture

    def shareable(i: int) -> bool:
        cls = get_architecture(points[i].arch)
        return not cls.multi_hook and cls.own_training_rows(dict(points[i].options)) is None

    together = [i for i in todo if shareable(i)]
    size = per_pass or max(1, len(together))
    groups = [together[a : a + size] for a in range(0, len(together), size)]
    return groups + [[i] for i in todo if not shareable(i)]


def _job(cfg: SweepConfig, point: SweepPoint, cache, cache_dir: str, out: Path) -> TrainJob:
    """The `saekit train` job of one point: cached activations, read and evaluated as they were cached."""
    from saekit.sae import get_architecture

    settings = cache.manifest["settings"]
    if get_architecture(point.arch).multi_hook:
        hooks = [cfg.hook] if cfg.hook else list(cache.hooks)
    elif cfg.hook or len(cache.hooks) == 1:
        hooks = [cfg.hook or cache.hooks[0]]
        if hooks[0] not in cache.hooks:
            raise ValueError(f"--hook {cfg.hook!r} is not in the cache, which holds {list(cache.hooks)}")
    else:
        raise ValueError(f"the cache holds several hook points {list(cache.hooks)}: choose one with --hook")
    extract = ExtractConfig(
        model=settings["model"].get("source") or settings["model"]["name"],
        hook=hooks,
        text=settings["source"],
        context_len=settings["context_len"],
        keep_special=not settings["exclude_special"],
        outlier_factor=settings["outlier_factor"] or 0.0,
    )
    return TrainJob(
        arch=point.arch,
        sae=dict(point.options),
        train={**DEFAULT_TRAIN, **cfg.train},
        extract=extract,
        eval=dataclasses.replace(cfg.eval),
        tokens=cfg.tokens,
        expansion=point.run_expansion,
        out=str(out / "runs" / point.name),
        cache=cache_dir,
    )


def _finished(run: Path, job: TrainJob) -> bool:
    """True when ``run`` holds a finished run of exactly ``job`` (compared as its run_config.json)."""
    try:
        saved = json.loads((run / "run_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (run / "summary.json").is_file() and saved == json.loads(json.dumps(job.to_dict()))


def _result_row(point: SweepPoint, summary: dict[str, Any], run: Path) -> dict[str, Any]:
    ev, train = summary.get("eval") or {}, summary.get("train") or {}
    width = json.loads((run / "sae" / "cfg.json").read_text())["config"]["width"]
    dead = ev.get("dead_fraction", train.get("dead_fraction"))
    return {
        "name": point.name,
        "arch": point.arch,
        "options": dict(point.options),
        "expansion": point.expansion,
        "width_factor": point.width_factor,
        "width": width,
        "l0": ev.get("l0"),
        "fvu": ev.get("fvu"),
        "ce_loss_recovered": ev.get("ce_loss_recovered"),
        "dead_fraction": dead,
        "train_seconds": train.get("train_seconds"),
        "run": str(run),
    }


# -- results ---------------------------------------------------------------------------------------------
def write_results(rows: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """results.json, results.csv (options as ``k=16 l1_coeff=2``) and the Pareto plots; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            options = " ".join(f"{k}={_fmt(v)}" for k, v in row["options"].items())
            writer.writerow({**row, "options": options})
    written = [out / "results.json", out / "results.csv"]
    for key, (filename, label, higher_better) in PLOTS.items():
        if any(_plottable(r, key) for r in rows):
            written.append(plot_pareto(rows, key, out / filename, label=label, higher_better=higher_better))
        else:
            print(f"no run has {label} (and a positive L0): {filename} not written", flush=True)
    return written


def pareto_front(points: list[tuple[float, float]], *, higher_better: bool) -> list[int]:
    """Indices of the (L0, metric) points that no other point beats: none has an L0 as low and a metric
    as good, one of them strictly. Sorted by L0."""
    sign = -1.0 if higher_better else 1.0  # minimise sign × metric
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if sign * points[i][1] < best:
            front.append(i)
            best = sign * points[i][1]
    return front


def _plottable(row: dict[str, Any], key: str) -> bool:
    value, l0 = row.get(key), row.get("l0")
    return isinstance(value, (int, float)) and isinstance(l0, (int, float)) and l0 > 0


def plot_pareto(
    rows: list[dict[str, Any]], key: str, path: str | Path, *, label: str, higher_better: bool
) -> Path:
    """L0 (log scale) against ``key``: per architecture, its points joined in order of L0 (marker by
    expansion) and its Pareto frontier drawn bold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    markers = dict(zip(sorted({r["expansion"] for r in rows}), "os^Dv<>p*h", strict=False))
    for n, arch in enumerate(dict.fromkeys(r["arch"] for r in rows)):
        mine = sorted((r for r in rows if r["arch"] == arch and _plottable(r, key)), key=lambda r: r["l0"])
        if not mine:
            continue
        color = f"C{n % 10}"
        xy = [(r["l0"], r[key]) for r in mine]
        ax.plot(*zip(*xy, strict=True), color=color, lw=0.8, alpha=0.4)
        for r in mine:
            ax.plot(r["l0"], r[key], markers.get(r["expansion"], "o"), color=color, alpha=0.6, ms=5)
        front = [xy[i] for i in pareto_front(xy, higher_better=higher_better)]
        ax.plot(*zip(*front, strict=True), "-o", color=color, lw=2.2, ms=7, label=arch)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1 2 5 10 20 50 ..., not 10^1 10^2
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="bold: Pareto frontier", fontsize=8)
    if len(markers) > 1:
        ax.set_title("markers: " + ", ".join(f"{m} {_fmt(e)}×" for e, m in markers.items()), fontsize=9)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.92)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


# -- command line ----------------------------------------------------------------------------------------
LIST_FIELDS = ("archs", "grid", "expansions", "width_factor")


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """The `saekit sweep` command, its options generated from :class:`SweepConfig`, TrainConfig and
    EvalConfig. List options take several values and may be repeated (--grid k=16,32 --grid l1=1,2)."""
    from saekit.train import TrainConfig

    p = subparsers.add_parser(
        "sweep",
        help="train a grid of SAEs (architectures × settings × widths) on one cache, with Pareto plots",
        description="Train every point of architectures × --grid settings × --expansions on one cache, "
        "evaluate each on held-out tokens, and write results.csv, results.json and Pareto plots (L0 "
        "against FVU and CE loss recovered). Run the same command again to resume.",
    )
    g = p.add_argument_group("sweep")
    add_dataclass_args(g, SweepConfig, skip={*LIST_FIELDS, "train", "eval"}, required={"cache", "out"})
    docs, hints = field_docs(SweepConfig), typing.get_type_hints(SweepConfig)
    for f in dataclasses.fields(SweepConfig):
        if f.name in LIST_FIELDS:
            default = f.default_factory()  # type: ignore[misc]
            g.add_argument(
                option_name(f.name),
                dest=f.name,
                nargs="+",
                action="extend",
                type=typing.get_args(hints[f.name])[0],
                default=None,
                help=docs[f.name] + (f" (default: {' '.join(map(str, default))})" if default else ""),
            )
    add_dataclass_args(p.add_argument_group("training (every run)"), TrainConfig, skip={"total_tokens"})
    add_dataclass_args(p.add_argument_group("evaluation (every run)"), EvalConfig)
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    from saekit.train import TrainConfig

    train = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    cfg = dataclass_from_args(
        SweepConfig,
        args,
        train={k: v for k, v in train.items() if v is not None},
        eval=dataclass_from_args(EvalConfig, args),
    )
    rows = run_sweep(cfg)
    for r in rows:
        figures = " ".join(f"{k} {r[k]:.4g}" for k in ("l0", "fvu", "ce_loss_recovered") if r[k] is not None)
        print(f"{r['name']}: {figures}")
    print(f"results: {Path(cfg.out) / 'results.csv'}")
    return 0
