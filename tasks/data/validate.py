"""Validate a clean partition with a Great Expectations checkpoint; a failing gate raises.

    llmops validate --day 2026-11-01

The suite lives in configs/validate.yaml (expectation class names and kwargs), applied to two
views of the partition: `records` (one row per conversation) and `turns` (one row per message).
Data Docs HTML is written to reports/data_docs/dt=<day>/index.html and its path returned.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tasks.atomic import tree_hash, write_json
from tasks.config import Settings
from tasks.data.partition import check_day, read_partition, turns_table
from tasks.errors import VerdictError
from tasks.lineage import LINEAGE_FILE, code_hash, read_lineage

log = logging.getLogger(__name__)


class ValidationFailed(VerdictError):
    """An expectation of the suite failed on the partition."""


def _frames(table) -> dict[str, Any]:
    records = table.drop_columns(["messages"]).to_pandas()
    # keep the column for the schema expectation without paying for a Python object per message
    records["messages"] = (table.column("messages").combine_chunks().value_lengths()
                           .to_numpy(zero_copy_only=False))
    return {"records": records, "turns": turns_table(table).to_pandas()}


def run_suite(frames: dict[str, Any], settings: Settings, docs_dir: Path | None, name: str) -> dict[str, Any]:
    """Run the configured suite as one checkpoint over the given DataFrames; return a summary."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    import great_expectations.expectations as gxe

    cfg = settings.validate_
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # per-metric bars flood task logs
    source = context.data_sources.add_pandas("chat")
    validations: list[Any] = []
    actions: list[Any] = []  # gx.checkpoint actions
    for table in ("records", "turns"):
        specs = [s for s in cfg.expectations if s.table == table]
        if not specs:
            continue
        suite = context.suites.add(gx.ExpectationSuite(name=f"{cfg.suite_name}.{table}"))
        for spec in specs:
            cls = getattr(gxe, spec.expectation, None)
            if cls is None:
                raise ValidationFailed(f"configs/validate.yaml: unknown expectation {spec.expectation!r}")
            suite.add_expectation(cls(**spec.kwargs))
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        validations.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}.{table}", data=batch, suite=suite)))
    if docs_dir is not None:
        site: Any = {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        }
        context.add_data_docs_site(site_name="local", site_config=site)
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["local"]))
    t0 = time.perf_counter()
    results = []
    for vd in validations:  # one checkpoint per table: each runs on its own DataFrame
        table = vd.name.rsplit(".", 1)[1]
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{name}.{table}", validation_definitions=[vd], actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 3}))
        run = checkpoint.run(batch_parameters={"dataframe": frames[table]})
        results += [(table, r) for r in run.run_results.values()]
    if docs_dir is not None:
        context.build_data_docs(site_names=["local"])
    secs = time.perf_counter() - t0
    failed = []
    evaluated = 0
    for table, r in results:
        for er in r.results:
            evaluated += 1
            if not er.success:
                cfg_ = er.expectation_config
                res = er.result or {}
                kwargs = cfg_.kwargs if cfg_ is not None else {}
                failed.append({
                    "table": table, "expectation": cfg_.type if cfg_ is not None else "unknown",
                    "kwargs": {k: v for k, v in kwargs.items() if k not in ("batch_id",)},
                    "unexpected_count": res.get("unexpected_count"),
                    "observed_value": res.get("observed_value"),
                    "examples": res.get("partial_unexpected_list", [])[:3],
                })
    return {"success": not failed, "evaluated": evaluated, "failed": failed, "seconds": round(secs, 3)}


def validate(day: str, settings: Settings) -> dict[str, Any]:
    day = check_day(day)
    part_dir = settings.paths.clean / f"dt={day}"
    docs_dir = (settings.paths.reports_dir / "data_docs" / f"dt={day}" if settings.validate_.data_docs
                else None)
    result_path = settings.paths.reports_dir / "validation" / f"dt={day}.json"
    # what the verdict depends on: the partition's content, the suite and the code
    key = tree_hash({"partition": (read_lineage(part_dir)["content_hash"]
                                   if (part_dir / LINEAGE_FILE).is_file() else ""),
                     "config": settings.hash("validate"), "code": code_hash("data")})
    if result_path.is_file():
        prev = json.loads(result_path.read_text())
        if (prev.get("key") == key and prev.get("success")
                and (docs_dir is None or (docs_dir / "index.html").is_file())):
            log.info("validate dt=%s: skipped, partition %s already passed this suite", day, key[:12])
            return {**prev, "skipped": "unchanged partition, suite and code"}
    table = read_partition(part_dir)
    summary = run_suite(_frames(table), settings, docs_dir, name=f"chat_clean_dt={day}")
    summary.update(dt=day, rows=table.num_rows, key=key,
                   data_docs=str(docs_dir / "index.html") if docs_dir is not None else None)
    write_json(result_path, summary)
    if not summary["success"]:
        lines = [f"  {f['table']}.{f['expectation']}({_short(f['kwargs'])}): "
                 f"unexpected {f['unexpected_count']}, "
                 f"observed {f['observed_value']!r}, e.g. {f['examples']!r}" for f in summary["failed"]]
        raise ValidationFailed(f"dt={day}: {len(summary['failed'])} of {summary['evaluated']} "
                               f"expectations failed (suite configs/validate.yaml):\n" + "\n".join(lines) +
                               f"\nData Docs: {summary['data_docs']}")
    log.info("validate dt=%s: %d expectations passed in %.1fs; Data Docs %s", day, summary["evaluated"],
             summary["seconds"], summary["data_docs"])
    return summary


def _short(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}"[:60] for k, v in kwargs.items())
