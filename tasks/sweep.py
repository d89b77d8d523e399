"""A sweep's plan and record: the trials a config's `sweep` section asks for, the samplers that choose them
(grid, seeded random, Optuna's TPE), the median rule that stops clearly losing ones, and the sweep folder.

```
<output_dir>/<name>/sweeps/<sweep id>/
  sweep.json        the space, the sampler and every trial: settings, state, run folder, dev scores
  leaderboard.md    the trials ranked on dev (what the `<name>-sweep` table artifact shows)
  plots/            the metric against each swept setting
```

The sweep id is a digest of the config (the sweep section included, except its `trials` and `parallel`), so
starting the same sweep again continues it: finished trials are kept, an unfinished one is run again with
the same settings (its training resumes from its checkpoint in the work store), and a larger `trials`
budget adds trials after the ones already there. Each trial is an ordinary run of the config with the
trial's settings, in runs/<name>/<UTC timestamp>/ like any other.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import random
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client

from loraflow.config import LoraflowConfig, SweepRange, SweepSettings
from loraflow.errors import ConfigError, SweepError, UserError
from loraflow.loading import with_settings
from loraflow.tasks.plots import plot_sweep
from loraflow.tasks.store import artifact_key, digest_of, named_for_config, run_logger, write_text_atomic

SWEEP_FILE = "sweep.json"
PRUNE_SHARES = (0.5, 0.75)  # where the median rule looks: a quarter of the way in is too noisy to judge
FINISHED, FAILED, RUNNING = "finished", "failed", "running"
METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy"}


def sweep_id(config: LoraflowConfig) -> str:
    """What makes two sweeps the same: the config's settings and the sweep's, but not its budget or width."""
    assert config.sweep is not None
    settings = config.model_dump(mode="json", exclude={"sweep", "output_dir", "registry", "compute"})
    return digest_of(settings, config.sweep.model_dump(mode="json", exclude={"trials", "parallel"}))[:12]


def sweep_folder(config: LoraflowConfig) -> Path:
    """<output_dir>/<name>/sweeps/<sweep id>/."""
    return Path(config.output_dir) / config.name / "sweeps" / sweep_id(config)


def concurrency_limit(config: LoraflowConfig) -> str:
    """The Prefect global concurrency limit that holds a config's trials to sweep.parallel at a time."""
    return f"sweep-{artifact_key(config.name)}"


def _significant(value: float, bounds: tuple[float, float]) -> float:
    """A drawn number at 4 significant digits (0.000734 in a leaderboard, not 0.0007339812), in bounds."""
    rounded = float(f"{value:.4g}")
    return min(max(rounded, bounds[0]), bounds[1])


def _draw(values: list[Any] | SweepRange, rng: random.Random) -> Any:
    if isinstance(values, list):
        return rng.choice(values)
    low, high = values.bounds
    if values.kind == "int_uniform":
        return rng.randint(int(low), int(high))
    if values.kind == "log_uniform":
        return _significant(math.exp(rng.uniform(math.log(low), math.log(high))), (low, high))
    return _significant(rng.uniform(low, high), (low, high))


class GridSampler:
    """Every combination of the lists, in the order the space lists them; with a smaller `trials` budget,
    the first ones of a seeded shuffle (so the budget spreads over the grid instead of varying only the last
    setting)."""

    def __init__(self, sweep: SweepSettings) -> None:
        keys = list(sweep.space)
        combos = [dict(zip(keys, c, strict=True)) for c in itertools.product(*sweep.space.values())]
        if sweep.trials is not None and sweep.trials < len(combos):
            random.Random(sweep.seed).shuffle(combos)
            combos = combos[: sweep.trials]
        self.planned = combos

    def next(self, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
        known = [t["params"] for t in trials]
        return next((p for p in self.planned if p not in known), None)

    def told(self, trial: dict[str, Any], metric: str) -> None:
        """Nothing to learn: the grid is fixed."""


class RandomSampler:
    """Independent draws, trial n from a generator seeded with (seed, n): the same sweep draws the same
    trials in any order, and a larger budget extends it. A draw equal to an earlier trial is drawn again."""

    def __init__(self, sweep: SweepSettings) -> None:
        self.sweep = sweep

    def next(self, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
        assert self.sweep.trials is not None
        if len(trials) >= self.sweep.trials:
            return None
        known, number = [t["params"] for t in trials], len(trials) + 1
        for attempt in range(200):
            rng = random.Random(f"{self.sweep.seed}:{number}:{attempt}")
            params = {key: _draw(values, rng) for key, values in self.sweep.space.items()}
            if params not in known:
                return params
        return None  # a small space of lists, every combination tried

    def told(self, trial: dict[str, Any], metric: str) -> None:
        """Nothing to learn: draws are independent."""


class TPESampler:
    """Optuna's TPE through its ask/tell interface: each next trial is asked for from the scores of the
    finished ones (those of an earlier run of the same sweep are told first). Lists are categorical choices
    by position, so that any value (a list of module names) can be one."""

    def __init__(self, sweep: SweepSettings) -> None:
        try:
            import optuna
        except ImportError:
            raise ConfigError(
                "sweep.sampler: tpe needs Optuna: pip install 'loraflow[sweep]' (or use grid or random)"
            ) from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.sweep = optuna, sweep
        self.study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=sweep.seed)
        )
        self.distributions = {key: self._distribution(values) for key, values in sweep.space.items()}
        self.asked: dict[int, Any] = {}  # trial number → the optuna trial it was asked as
        self.known: set[int] = set()  # trial numbers the study has heard of

    def _distribution(self, values: list[Any] | SweepRange) -> Any:
        distributions = self.optuna.distributions
        if isinstance(values, list):
            return distributions.CategoricalDistribution(list(range(len(values))))
        low, high = values.bounds
        if values.kind == "int_uniform":
            return distributions.IntDistribution(int(low), int(high))
        return distributions.FloatDistribution(low, high, log=values.kind == "log_uniform")

    def _encoded(self, params: dict[str, Any]) -> dict[str, Any]:
        space = self.sweep.space
        return {k: space[k].index(v) if isinstance(space[k], list) else v for k, v in params.items()}

    def next(self, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
        assert self.sweep.trials is not None
        for trial in trials:  # an earlier run's trials: told before asking, so TPE learns from them
            if trial["number"] not in self.known and trial["state"] != RUNNING:
                self.told(trial, "")
        if len(trials) >= self.sweep.trials:
            return None
        asked = self.study.ask(self.distributions)
        self.asked[len(trials) + 1] = asked
        self.known.add(len(trials) + 1)
        params = {}
        for key, values in self.sweep.space.items():
            value = asked.params[key]
            params[key] = values[value] if isinstance(values, list) else self._rounded(values, value)
        return params

    def _rounded(self, values: SweepRange, value: Any) -> Any:
        return int(value) if values.kind == "int_uniform" else _significant(value, values.bounds)

    def told(self, trial: dict[str, Any], metric: str) -> None:
        """Tell the study how a trial ended: its dev score, or that it failed."""
        states = self.optuna.trial.TrialState
        value = trial.get(metric or trial.get("metric", "macro_f1"))
        ok = trial["state"] == FINISHED and value is not None
        asked = self.asked.pop(trial["number"], None)
        if asked is not None:
            self.study.tell(asked, value if ok else None, state=states.COMPLETE if ok else states.FAIL)
        else:
            self.study.add_trial(
                self.optuna.trial.create_trial(
                    params=self._encoded(trial["params"]),
                    distributions=self.distributions,
                    value=value if ok else None,
                    state=states.COMPLETE if ok else states.FAIL,
                )
            )
        self.known.add(trial["number"])


SAMPLERS = {"grid": GridSampler, "random": RandomSampler, "tpe": TPESampler}


def _best_by_share(trial: dict[str, Any], share: float) -> float | None:
    """A trial's best dev macro-F1 among its evaluations up to `share` of its run; None if none was."""
    seen = [f1 for at, f1 in trial.get("curve") or [] if at <= share + 1e-9]
    return max(seen) if seen else None


def median_floors(trials: list[dict[str, Any]], prune_after: int) -> dict[float, float]:
    """The median rule's train.stop_below for the next trial: at each of PRUNE_SHARES, the median of the
    finished trials' best dev macro-F1 by then, once at least `prune_after` of them have one."""
    floors = {}
    for share in PRUNE_SHARES:
        scores = [s for t in trials if t["state"] == FINISHED and (s := _best_by_share(t, share)) is not None]
        if len(scores) >= prune_after:
            floors[share] = round(statistics.median(scores), 6)
    return floors


@dataclass
class Sweep:
    """One sweep of a config, as the flow runs it: its folder, sweep.json's record, the sampler."""

    config: LoraflowConfig
    folder: Path
    record: dict[str, Any]
    sampler: Any
    rerun: list[dict[str, Any]] = field(default_factory=list)  # an earlier run's unfinished trials

    @property
    def settings(self) -> SweepSettings:
        assert self.config.sweep is not None
        return self.config.sweep

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.record["trials"]

    @property
    def limit(self) -> str:
        """The name of the Prefect concurrency limit each trial takes a slot of."""
        return concurrency_limit(self.config)

    def trial_config(self, trial: dict[str, Any]) -> LoraflowConfig:
        """The config a trial trains: the sweep's settings applied, its median-rule floors, no sweep."""
        settings = {**trial["params"], "sweep": None}
        if trial.get("stop_below"):
            settings["train.stop_below"] = trial["stop_below"]
        return with_settings(self.config, settings, f"sweep trial {trial['number']} ({_described(trial)})")

    def next_trial(self) -> dict[str, Any] | None:
        """The next trial to start (marked running in sweep.json), or None when the budget is spent: an
        earlier run's unfinished trials first, then the sampler's."""
        if self.rerun:
            trial = self.rerun.pop(0)
        else:
            params = self.sampler.next(self.trials)
            if params is None:
                return None
            trial = {"number": len(self.trials) + 1, "params": params}
            if self.settings.prune:
                trial["stop_below"] = median_floors(self.trials, self.settings.prune_after)
            self.trials.append(trial)
        trial |= {"state": RUNNING, "started": _now(), "error": None}
        self.save()
        return trial

    def finished(self, trial: dict[str, Any], run_dir: str | None, error: str | None) -> dict[str, Any]:
        """Record how a trial ended (its run folder's dev scores, or its error) and tell the sampler."""
        trial |= {"finished": _now(), "run": run_dir, "error": error}
        if run_dir is None:
            trial["state"] = FAILED
        else:
            metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
            selection = metrics["train"].get("selection") or {}
            total = selection.get("max_steps") or metrics["train"]["steps"]
            trial |= {
                "state": FINISHED,
                "macro_f1": metrics["finetuned"]["macro_f1"],
                "accuracy": metrics["finetuned"]["accuracy"],
                "train_seconds": metrics["train"]["seconds"],
                "steps": metrics["train"]["steps"],
                "stopped_below": selection.get("stopped_below"),
                "curve": [[round(p["step"] / total, 4), p["macro_f1"]] for p in selection.get("curve") or []],
            }
        self.sampler.told(trial, self.settings.metric)
        self.save()
        return trial

    def best(self) -> dict[str, Any] | None:
        """The finished trial with the best dev metric (the earlier one on a tie), or None."""
        done = [t for t in self.trials if t["state"] == FINISHED]
        return max(done, key=lambda t: (t[self.settings.metric], -t["number"])) if done else None

    def save(self) -> None:
        best = self.best()
        self.record["best"] = (
            {k: best[k] for k in ("number", "params", "run", self.settings.metric)} if best else None
        )
        self.record["updated"] = _now()
        write_text_atomic(self.folder / SWEEP_FILE, json.dumps(self.record, indent=1, default=str))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _described(trial: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_shown(v)}" for k, v in trial["params"].items())


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def check_trials(config: LoraflowConfig) -> list[LoraflowConfig]:
    """The config of every trial a grid or random sweep plans (each range at both ends for the others),
    validated up front: a bad value is one ConfigError before anything trains."""
    sweep = config.sweep
    if sweep is None:
        raise ConfigError(
            f"{config.name}: no `sweep` section; add one with a space, e.g. "
            "sweep: {space: {lora.r: [8, 16]}}"
        )
    if sweep.sampler == "tpe":
        TPESampler(sweep)  # Optuna is there
        corners = [{k: v if isinstance(v, list) else list(v.bounds) for k, v in sweep.space.items()}]
        planned = [dict(zip(c, p, strict=True)) for c in corners for p in itertools.product(*c.values())]
    else:
        sampler, planned = SAMPLERS[sweep.sampler](sweep), []
        while (params := sampler.next([{"params": p} for p in planned])) is not None:
            planned.append(params)
    probe = Sweep(config, Path(), {"trials": []}, None)
    return [probe.trial_config({"number": n, "params": p}) for n, p in enumerate(planned, 1)]


@task(name="open-sweep", task_run_name=named_for_config("open-sweep"), cache_policy=NO_CACHE)
def open_sweep(config: LoraflowConfig) -> Sweep:
    """The sweep of `config`: every planned trial's config checked, its folder, sweep.json so far (an
    earlier run's finished trials kept, unfinished ones to run again), and the Prefect concurrency limit
    (`sweep-<name>`, sweep.parallel slots) that every trial takes a slot of."""
    planned = check_trials(config)
    assert config.sweep is not None
    folder = sweep_folder(config)
    path = folder / SWEEP_FILE
    if path.is_file():
        record = json.loads(path.read_text())
        rerun = [t for t in record["trials"] if t["state"] != FINISHED]
        kept = len(record["trials"]) - len(rerun)
        run_logger().info(
            "continuing sweep %s: %d trial(s) finished, %d to run again", folder.name, kept, len(rerun)
        )
    else:
        space = {
            k: v if isinstance(v, list) else {v.kind: list(v.bounds)} for k, v in config.sweep.space.items()
        }
        record = {
            "sweep": folder.name,
            "config": config.name,
            "space": space,
            "sampler": config.sweep.sampler,
            "seed": config.sweep.seed,
            "metric": config.sweep.metric,
            "split": "dev",
            "started": _now(),
            "trials": [],
        }
        rerun = []
    record["budget"] = config.sweep.trials or len(planned)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(concurrency_limit(config), config.sweep.parallel)
    sweep = Sweep(config, folder, record, SAMPLERS[config.sweep.sampler](config.sweep), rerun)
    sweep.save()
    run_logger().info(
        "sweep %s of %s: %s sampler, %d trial(s), %d at a time; %s",
        folder.name,
        config.name,
        config.sweep.sampler,
        record["budget"],
        config.sweep.parallel,
        folder / SWEEP_FILE,
    )
    return sweep


def leaderboard_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """The trials, best first (then running and failed ones): rank, trial, each swept setting, dev scores,
    train time, state, run folder."""
    metric = sweep.settings.metric
    done = sorted(
        (t for t in sweep.trials if t["state"] == FINISHED), key=lambda t: (-t[metric], t["number"])
    )
    rest = [t for t in sweep.trials if t["state"] != FINISHED]
    rows = []
    for rank, trial in enumerate([*done, *rest], 1):
        state = trial["state"]
        if trial.get("stopped_below"):
            state = f"stopped at step {trial['stopped_below']['step']} (median rule)"
        elif state == FAILED:
            state = f"failed: {(trial.get('error') or '').splitlines()[0][:120]}"
        rows.append(
            {
                "rank": rank if trial["state"] == FINISHED else "-",
                "trial": trial["number"],
                **{k: _shown(v) for k, v in trial["params"].items()},
                "dev macro-F1": f"{trial['macro_f1']:.4f}" if "macro_f1" in trial else "-",
                "dev accuracy": f"{trial['accuracy']:.4f}" if "accuracy" in trial else "-",
                "train s": f"{trial['train_seconds']:.0f}" if "train_seconds" in trial else "-",
                "state": state,
                "run": Path(trial["run"]).name if trial.get("run") else "-",
            }
        )
    return rows


def leaderboard_markdown(sweep: Sweep) -> str:
    """leaderboard.md: a heading line, the table, where each run folder is."""
    rows = leaderboard_rows(sweep)
    done = sum(1 for t in sweep.trials if t["state"] == FINISHED)
    lines = [
        f"# Sweep {sweep.folder.name} of {sweep.config.name}",
        "",
        f"{sweep.settings.sampler} sampler, {done} of {sweep.record['budget']} trial(s) finished, ranked by "
        f"dev {METRIC_NAMES[sweep.settings.metric]}; run folders under "
        f"`{Path(sweep.config.output_dir) / sweep.config.name}`.",
        "",
    ]
    if rows:
        keys = list(rows[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def next_finished(futures: list[Any]) -> Any:
    """The first of the running trials' futures to finish. It waits in one-second slices: Python runs signal
    handlers in the main thread, and the OS may deliver a Ctrl-C or SIGTERM to a training thread, in which
    case an untimed wait would see it only when a trial ends. On a stop signal the trials' training threads
    are asked to stop (else the flow's end would wait for them to train to the last step)."""
    wrapped = {future.wrapped_future: future for future in futures}
    try:
        while True:
            done, _ = concurrent.futures.wait(
                list(wrapped), timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED
            )
            if done:
                return wrapped[next(iter(done))]
    except BaseException:  # a stop signal: the trials' threads stop at their next step, then the sweep ends
        from loraflow.tasks.lora import stop_training_threads

        stop_training_threads()
        raise


def trial_outcome(future: Any) -> tuple[str | None, str | None]:
    """(run folder, None) of a trial's task run that completed, or (None, what stopped it): a failed trial
    is recorded and the sweep goes on."""
    future.wait()
    try:
        return str(future.result()), None
    except UserError as e:  # the message is the whole story
        return None, str(e)
    except Exception as e:  # noqa: BLE001 (any other failure of one trial is recorded, with its type)
        return None, f"{type(e).__name__}: {e}"


@task(name="record-trial", task_run_name="record-trial-{trial[number]}", cache_policy=NO_CACHE)
def record_trial(
    sweep: Sweep, trial: dict[str, Any], run_dir: str | None, error: str | None
) -> dict[str, Any]:
    """A trial ended: its dev scores (or its error) into sweep.json, and the leaderboard artifact updated."""
    trial = sweep.finished(trial, run_dir, error)
    if error is None:
        run_logger().info(
            "trial %d (%s): dev macro-F1 %.4f, accuracy %.4f%s",
            trial["number"],
            _described(trial),
            trial["macro_f1"],
            trial["accuracy"],
            " (stopped by the median rule)" if trial.get("stopped_below") else "",
        )
    else:
        run_logger().warning("trial %d (%s) failed: %s", trial["number"], _described(trial), error)
    create_table_artifact(
        key=f"{artifact_key(sweep.config.name)}-sweep",
        table=leaderboard_rows(sweep),
        description=f"Sweep {sweep.folder.name} of {sweep.config.name}: trials ranked by dev "
        f"{sweep.settings.metric}",
    )
    return trial


@task(name="finish-sweep", task_run_name=named_for_config("finish-sweep"), cache_policy=NO_CACHE)
def finish_sweep(sweep: Sweep) -> dict[str, Any]:
    """leaderboard.md and the plot of the metric against each swept setting in the sweep folder, the same
    as a markdown artifact; returns the best trial (an error when no trial finished)."""
    board = leaderboard_markdown(sweep)
    write_text_atomic(sweep.folder / "leaderboard.md", board)
    inline = plot_sweep(
        sweep.trials, list(sweep.settings.space), sweep.settings.metric, sweep.folder / "plots" / "sweep.png"
    )
    best = sweep.best()
    summary = (
        f"**best: trial {best['number']}** ({_described(best)}), dev {sweep.settings.metric} "
        f"{best[sweep.settings.metric]:.4f}: `{best['run']}`"
        if best
        else "**no trial finished**; their errors are in the table"
    )
    markdown = f"{summary}\n\n{board}" + (
        f"\n![metric against each swept setting]({inline})\n" if inline else ""
    )
    create_markdown_artifact(key=f"{artifact_key(sweep.config.name)}-sweep-report", markdown=markdown)
    if best is None:
        raise SweepError(
            f"no trial of sweep {sweep.folder.name} finished; each one's error is in "
            f"{sweep.folder / 'leaderboard.md'} and in its flow run's log"
        )
    run_logger().info("%s; leaderboard: %s", summary.replace("**", ""), sweep.folder / "leaderboard.md")
    return best
