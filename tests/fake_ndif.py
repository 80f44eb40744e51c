"""A stand-in for the NDIF service, in this process: what `--remote ndif` sends is served as NDIF would.

nnsight's `RemoteBackend.request` (the websocket + HTTP exchange with the service) is replaced by a server that
takes the request the client built (`RemoteBackend._serialize`: the trace's source and the variables it uses,
the model named only by its key), deserialises it with this process' own modules hidden (as on a server, where
sinkscope is not installed: its code must travel by value), runs it on the server's own copy of the model (an
nnsight `TransformersModel` with real weights, loaded from the checkpoint the key names), keeps what the trace
saved, and sends that back through `torch.save`/`torch.load` (the wire). The hub lookup that canonicalises the repo
id (`HfApi.model_info`) answers from a table, the service's status lists the served models as running, and an API
key is set. Each request is recorded: model key, env, payload and result bytes.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from types import SimpleNamespace
from unittest import mock

import torch


@dataclass
class Request:
    model_key: str
    env: dict
    payload_bytes: int
    result_bytes: int
    saved: list = field(default_factory=list)


@contextlib.contextmanager
def fake_ndif(checkpoints: dict[str, str], running: tuple[str, ...] | None = None):
    """Serve {hub id: local checkpoint directory}, those in `running` (default: all) listed as running; yields the
    list of requests served."""
    from nnsight import TransformersModel
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.schema.request import RequestModel
    from nnsight.tracing import tracer as tracing

    served: list[Request] = []
    servers: dict[str, object] = {}
    by_path = {path: repo for repo, path in checkpoints.items()}

    def model_info(self, repo_id, *args, **kwargs):
        return SimpleNamespace(id=by_path.get(repo_id, repo_id))

    def server_model(model_key: str):
        import json

        key = json.loads(model_key.split(":", 1)[1])
        repo, task = key["repo_id"], key["task"]
        if (repo, task) not in servers:  # the deployment: the checkpoint under its task, default attention
            from transformers import AutoProcessor, AutoTokenizer

            path = checkpoints[repo]
            if task == "text-generation":
                parts = {"tokenizer": AutoTokenizer.from_pretrained(path)}
            else:
                processor = AutoProcessor.from_pretrained(path)
                parts = {"processor": processor, "tokenizer": processor.tokenizer}
            servers[repo, task] = TransformersModel(path, task=task, dispatch=True, **parts)
        return servers[repo, task]

    def request(self, request, tracer):
        payload = self._serialize(tracer)
        server = server_model(request.model_key)
        server._remoteable_set_env(request.env)  # what the service applies before it runs the request
        hiding = LocalSimulationBackend(server)
        hidden = hiding._hide_local_modules()
        try:
            restored = RequestModel.deserialize(payload, server._remoteable_persistent_objects(),
                                                compress=self.compress)
        finally:
            hiding._restore(hidden)
        tracing.inc()
        try:
            restored.execute(restored.info.code)
            saves = tracing._saves()
            result = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in saves}
        finally:
            tracing.dec()
        wire = io.BytesIO()
        torch.save(result, wire)
        served.append(Request(request.model_key, dict(request.env), len(payload), wire.tell(), sorted(result)))
        return torch.load(io.BytesIO(wire.getvalue()), weights_only=False)

    def status(path, *args, **kwargs):  # nnsight.ndif._get: the service's /status, each served model RUNNING
        assert path == "/status"
        return {"deployments": {f"{repo} ({task})": {
            "repo_id": repo, "revision": None, "task": task, "deployment_level": "HOT", "application_state": "RUNNING",
            "model_key": f"nnsight.modeling.transformers.TransformersModel:{repo}"}
            for repo in (checkpoints if running is None else running) for task in ("text-generation",
                                                                                      "image-text-to-text")}}

    from nnsight.schema.config import CONFIG

    with mock.patch("huggingface_hub.HfApi.model_info", model_info), mock.patch.object(RemoteBackend, "request",
                                                                                         request), \
            mock.patch("nnsight.ndif._get", status), mock.patch.object(CONFIG.API, "APIKEY", CONFIG.API.APIKEY or "key"):
        yield served
