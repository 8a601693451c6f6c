"""Data: raw chat logs to training windows.

    adapters -> ingest (normalise, scrub PII, quarantine rejects) -> partition (dt=YYYY-MM-DD parquet)
    -> validate (Great Expectations) -> snapshot (DVC) -> shard (BPE tokenizer, token shards)
    -> sampler (the windows a training step or an evaluation reads)

synth writes synthetic raw logs for demos, tests and benchmarks.
"""
