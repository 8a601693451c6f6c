"""Triton Python-backend model for the chat GPT; `llmops export` copies it into each version as model.py.

A version directory is self-contained: this file, `gpt.py` and `chat_template.py` (the very
modules training used, copied at export), `prefix_cache.py`, `model.safetensors`, `config.json`,
`tokenizer.json` and `_lineage.json`. Nothing is unpickled.

Requests arrive in dynamic batches; `execute` runs them together with the KV-cache decoder
(`gpt.generate_stream`: left-padded, each request with its own limits and sampling). In the
decoupled (streaming) model the same loop sends one response per new token to each request's
sender, then a final one with the finish reason and token counts.

Leading system messages are tokenized once per content hash, and a batch whose rows share them
(serve.triton.prefix_cache_min_tokens or more) starts its prefill from their cached K/V (up to
serve.triton.prefix_cache_mb per instance; 0: off). See tasks/model/prefix_cache.py.

Inputs (per request):  messages STRING (JSON list of {role, content}), max_tokens INT32,
                       temperature FP32, top_p FP32, seed INT64, presence_penalty FP32,
                       frequency_penalty FP32, logit_bias BYTES (a JSON object {token id: bias})
                       (all but messages optional)
Outputs:               text STRING, token_ids INT64[-1], prompt_tokens INT32, completion_tokens INT32,
                       finish_reason STRING, batch_size INT32,
                       cached_tokens INT32 (prompt tokens whose K/V came from the prefix cache),
                       queue_ms FP32, prefill_ms FP32, decode_ms FP32, steps INT32 (the request's
                       phases in the engine), joined INT32 (sequences decoding when it was admitted;
                       `batch_size` is then the most sequences it decoded together with)

Scheduling (parameter `scheduler`): `continuous` (decoupled models) hands each request to the
instance's engine (tasks/model/engine.py) and returns: one scheduler thread per instance keeps a
running batch that sequences join and leave at every decode step, up to `max_seqs` sequences and
`max_batch_tokens` tokens per step. `execute` runs each dynamic batch to its end inside `execute()`
(the static batching that came before; the benchmark's baseline). A decoupled request with the
optional input `stream` false gets one final response with the whole text instead of one per token.
"""

import contextlib
import json
import os
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _scalar(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    value = t.as_numpy().reshape(-1)[0]
    return value.item() if hasattr(value, "item") else value  # a BYTES input is bytes already


class _EngineMetrics:
    """The engine's figures on Triton's metrics endpoint (the Python backend's custom metrics), labelled
    by model and version: gauges of what it holds now, counters of what it has done."""

    GAUGES = {"running": "Sequences in the running batch (decoding or prefilling)",
              "waiting": "Requests waiting for a place in the running batch",
              "kv_use": "Share of the preallocated K/V cache positions in use"}
    COUNTERS = {"finished": "Sequences that ended (stop or length)",
                "cancelled": "Sequences stopped because their client cancelled (within one step)",
                "timeouts": "Requests that waited past their deadline",
                "joined_mid_decode": "Sequences admitted while others were decoding",
                "steps": "Engine steps (one decode step of the running batch each)",
                "decode_tokens": "Tokens generated", "prefill_tokens": "Prompt tokens prefilled",
                "busy_s": "Seconds the engine spent stepping (its busy time)",
                "cancel_checks": "Requests asked whether their client cancelled them"}

    def __init__(self, args):
        labels = {"model": str(args.get("model_name", "")), "version": str(args.get("model_version", "")),
                  "instance": str(args.get("model_instance_name", ""))}
        self.metrics, self.sent = {}, {}
        try:
            for kind, names in ((pb_utils.MetricFamily.GAUGE, self.GAUGES),
                                (pb_utils.MetricFamily.COUNTER, self.COUNTERS)):
                for key, text in names.items():
                    name = "llmops_engine_busy_seconds" if key == "busy_s" else f"llmops_engine_{key}"
                    family = pb_utils.MetricFamily(name=name, description=text, kind=kind)
                    self.metrics[key] = (family, family.Metric(labels=labels))
        except Exception:  # noqa: BLE001 - a server without custom metrics still serves
            self.metrics = {}

    def publish(self, snap):
        for key, (_, metric) in self.metrics.items():
            if key in self.GAUGES:
                metric.set(float(snap[key]))
            else:
                delta = snap[key] - self.sent.get(key, 0)
                if delta > 0:
                    metric.increment(float(delta))
                    self.sent[key] = snap[key]


class TritonPythonModel:
    def initialize(self, args):
        import chat_template
        import engine
        import gpt
        import prefix_cache
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.torch, self.gpt = torch, gpt
        self.model_config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.model_config)
        params = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        threads = int(params.get("threads_per_instance", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        elif params.get("device") == "gpu":  # a CPU-kind instance that still computes on the GPU
            self.device = torch.device("cuda:0")
        else:
            self.device = torch.device("cpu")
        cfg = json.load(open(os.path.join(HERE, "config.json")))["model"]
        self.model = gpt.GPT(gpt.GPTConfig(**cfg))
        missing, unexpected = self.model.load_state_dict(load_file(os.path.join(HERE, "model.safetensors")),
                                                         strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            params.get("dtype", "float32")]
        self.model.to(self.device, dtype=dtype).eval()
        self.tok = Tokenizer.from_file(os.path.join(HERE, "tokenizer.json"))
        self.stop = tuple(i for i in (self.tok.token_to_id(chat_template.EOS),
                                      self.tok.token_to_id(chat_template.EOT))
                          if i is not None)
        self.block = self.model.cfg.block_size
        # absent parameters (a hand-written config.pbtxt): no K/V cache; the tokenized prefixes always
        self.prompts = prefix_cache.PromptEncoder(self.tok, chat_template.render_chat)
        self.prefix_kv = prefix_cache.PrefixKV(int(float(params.get("prefix_cache_mb", "0")) * 2**20),
                                               int(params.get("prefix_cache_min_tokens", "16")))
        # a rollout drill: drill.json in a version directory makes that version slower on purpose, to
        # rehearse an automatic roll-back (`llmops rollout drill`); absent in normal exports
        drill = os.path.join(HERE, "drill.json")
        self.drill_delay_s = (json.load(open(drill)).get("delay_ms_per_token", 0) / 1000
                              if os.path.exists(drill) else 0.0)
        self.engine = None
        if self.decoupled and params.get("scheduler", "continuous") == "continuous":
            self.engine_mod = engine
            self.engine = engine.Engine(self.model, gpt, self.stop,
                                        max_seqs=int(params.get("max_seqs", "16")),
                                        max_batch_tokens=int(params.get("max_batch_tokens", "256")),
                                        prefix_kv=self.prefix_kv, step_delay_s=self.drill_delay_s,
                                        cancel_check_s=float(params.get("cancel_check_ms", "0")) / 1e3)
            self._stop = threading.Event()
            self._metrics = _EngineMetrics(args)
            self._loop = threading.Thread(target=self._serve, args=(threads,), daemon=True,
                                          name="llmops-engine")
            self._loop.start()

    def _serve(self, threads):
        """The engine's thread. torch's intra-op thread count is per thread (OpenMP): set it here too, or
        this thread would use every core and oversubscribe the machine with the other instances."""
        if threads > 0:
            self.torch.set_num_threads(threads)
        self.engine.run(self._stop, self._metrics.publish)

    def _parse(self, request):
        raw = pb_utils.get_input_tensor_by_name(request, "messages").as_numpy().reshape(-1)[0]
        messages = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")
                for m in messages):
            raise ValueError("messages must be a non-empty JSON list of "
                             "{role: system|user|assistant, content: str}")
        max_tokens = int(_scalar(request, "max_tokens", 64))
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        # == chat_template.encode_chat(..., add_generation_prompt=True)
        ids, cuts = self.prompts.encode(messages)
        keep = max(1, self.block - max_tokens)
        if len(ids) > keep:  # the gateway already fitted whole turns; this only guards the model's window
            ids, cuts = ids[-keep:], []  # (and the system messages no longer lead)
        seed = int(_scalar(request, "seed", -1))
        gen = None
        temperature = float(_scalar(request, "temperature", 0.0))
        if temperature > 0:
            gen = self.torch.Generator(device=self.device)
            gen.manual_seed(seed if seed >= 0 else int.from_bytes(os.urandom(7), "little"))
        top_p = float(_scalar(request, "top_p", 1.0))
        bias_raw = _scalar(request, "logit_bias", b"")
        bias_raw = bias_raw.decode("utf-8") if isinstance(bias_raw, bytes) else str(bias_raw)
        bias = json.loads(bias_raw) if bias_raw.strip() else {}
        vocab = self.model.cfg.vocab_size
        if not isinstance(bias, dict) or not all(
                str(k).isdigit() and int(k) < vocab and isinstance(v, int | float) and -100 <= v <= 100
                for k, v in bias.items()):
            raise ValueError(f"logit_bias must map token ids below {vocab} to numbers in [-100, 100]")
        penalties = self.gpt.Penalties(float(_scalar(request, "presence_penalty", 0.0)),
                                       float(_scalar(request, "frequency_penalty", 0.0)),
                                       tuple(sorted((int(k), float(v)) for k, v in bias.items())))
        return {"ids": ids, "cuts": cuts, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p if top_p < 1.0 else None, "generator": gen, "penalties": penalties,
                "stream": bool(_scalar(request, "stream", True)),
                "priority": int(_scalar(request, "priority", 0))}

    def execute(self, requests):
        if self.engine is not None:
            for request in requests:
                try:
                    self.engine.submit(self._seq(request, self._parse(request)))
                except Exception as e:  # noqa: BLE001 - a bad request fails alone, with its reason
                    request.get_response_sender().send(
                        pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {e}")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                parsed.append((i, self._parse(request)))
            except Exception as e:  # noqa: BLE001 - a bad request fails alone, with its reason
                err = pb_utils.TritonError(f"bad request: {e}")
                if self.decoupled:
                    request.get_response_sender().send(pb_utils.InferenceResponse(error=err),
                                                       flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    responses[i] = pb_utils.InferenceResponse(error=err)
        if parsed:
            self._run(requests, parsed, responses)
        return None if self.decoupled else responses

    def _seq(self, request, p):
        """The engine's sequence for one request: its tokens go to the request's response sender as they
        come (decoded incrementally), its end as the final response with counts and phases."""
        sender = request.get_response_sender()
        detok = {"prefix": 0, "read": 0, "sent": 0}  # token offsets (TGI's prefix/read offsets; tokens sent)

        def on_token(seq, tok):
            if not p["stream"]:
                return
            # incremental detokenisation (as TGI and vLLM): decode only the last few tokens; one response per
            # token, except that tokens ending inside a UTF-8 character wait and go out with the next one
            out = seq.out
            before = self.tok.decode(out[detok["prefix"]:detok["read"]], skip_special_tokens=True)
            text = self.tok.decode(out[detok["prefix"]:], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                return  # an incomplete character: its tokens go with the next response
            new = out[detok["sent"]:]
            if len(text) > len(before):
                detok["prefix"], detok["read"] = detok["read"], len(out)
            detok["sent"] = len(out)
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text", np.array([[text[len(before):].encode()]], dtype=np.object_)),
                pb_utils.Tensor("token_ids", np.array([new], dtype=np.int64))]))

        def on_finish(seq):
            if seq.finish == "cancelled":
                with contextlib.suppress(Exception):  # the stream may be closed already
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            if seq.finish in ("error", "timeout"):
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{'bad request' if seq.finish == 'error' else 'timeout'}: {seq.error}")),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            p["cached_tokens"] = seq.cached_tokens
            text = "" if p["stream"] else self.tok.decode(seq.out, skip_special_tokens=True)
            sender.send(self._response(p, seq.out, seq.finish, seq.peak, text, seq),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        return self.engine_mod.Seq(
            p["ids"], p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
            generator=p["generator"], penalties=p["penalties"] if p["penalties"].active else None,
            cuts=p["cuts"], priority=p["priority"], on_token=on_token, on_finish=on_finish,
            cancelled=request.is_cancelled)

    def _run(self, requests, parsed, responses):
        n = len(parsed)
        outs = [[] for _ in range(n)]
        texts = [""] * n
        finish = ["length"] * n
        senders = [requests[i].get_response_sender() for i, _ in parsed] if self.decoupled else None
        prefix, cached = self.prefix_kv.for_batch([p["ids"] for _, p in parsed],
                                                  [p["cuts"] for _, p in parsed],
                                                  lambda ids: self.gpt.prefill(self.model, ids))
        for (_, p), c in zip(parsed, cached, strict=True):
            p["cached_tokens"] = c
        steps = self.gpt.generate_stream(
            self.model, [p["ids"] for _, p in parsed], [p["max_tokens"] for _, p in parsed],
            [p["temperature"] for _, p in parsed], top_p=[p["top_p"] for _, p in parsed],
            stop_tokens=self.stop, generators=[p["generator"] for _, p in parsed], prefix=prefix,
            penalties=[p["penalties"] for _, p in parsed])
        finished = [False] * n
        room = self.block - max(len(p["ids"]) for _, p in parsed)
        limits = [max(0, min(p["max_tokens"], room)) for _, p in parsed]
        for step in steps:
            if self.drill_delay_s:
                time.sleep(self.drill_delay_s)
            for b, tok in enumerate(step):
                if finished[b]:
                    continue
                if tok is None:
                    finished[b] = True
                    finish[b] = "stop" if len(outs[b]) < limits[b] else "length"
                    if self.decoupled:
                        self._final(senders[b], parsed[b][1], outs[b], finish[b], n)
                    continue
                outs[b].append(tok)
                if self.decoupled and parsed[b][1]["stream"]:
                    text = self.tok.decode(outs[b], skip_special_tokens=True)
                    if text.endswith("\ufffd"):
                        continue  # an incomplete UTF-8 sequence: wait for its next byte
                    delta, texts[b] = text[len(texts[b]):], text
                    senders[b].send(pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("text", np.array([[delta.encode()]], dtype=np.object_)),
                        pb_utils.Tensor("token_ids", np.array([[tok]], dtype=np.int64))]))
            if all(finished):
                break  # every row ended: no step more for this batch
        steps.close()
        for b in range(n):
            if not finished[b]:  # reached its limit (or the window) on the last step
                if self.decoupled:
                    self._final(senders[b], parsed[b][1], outs[b], finish[b], n)
            if not self.decoupled:
                responses[parsed[b][0]] = self._response(parsed[b][1], outs[b], finish[b], n,
                                                         self.tok.decode(outs[b], skip_special_tokens=True))

    def _response(self, p, out, finish, batch, text, seq=None):
        phases = seq.phases() if seq is not None else {"queue_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0}
        return pb_utils.InferenceResponse(output_tensors=[
            *(pb_utils.Tensor(k, np.array([[v]], dtype=np.float32)) for k, v in phases.items()),
            pb_utils.Tensor("steps", np.array([[seq.steps if seq is not None else len(out)]],
                                              dtype=np.int32)),
            pb_utils.Tensor("joined", np.array([[seq.joined if seq is not None else 0]], dtype=np.int32)),
            pb_utils.Tensor("text", np.array([[text.encode()]], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.array([out], dtype=np.int64).reshape(1, len(out))),
            pb_utils.Tensor("prompt_tokens", np.array([[len(p["ids"])]], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([[len(out)]], dtype=np.int32)),
            pb_utils.Tensor("finish_reason", np.array([[finish.encode()]], dtype=np.object_)),
            pb_utils.Tensor("batch_size", np.array([[batch]], dtype=np.int32)),
            pb_utils.Tensor("cached_tokens", np.array([[p["cached_tokens"]]], dtype=np.int32))])

    def _final(self, sender, p, out, finish, batch):
        text = "" if p["stream"] else self.tok.decode(out, skip_special_tokens=True)
        sender.send(self._response(p, out, finish, batch, text),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        if self.engine is not None:
            self._stop.set()
            self.engine.wake()
            self._loop.join(timeout=10)
        self.model = None
