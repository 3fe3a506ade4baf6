"""The OpenAI-compatible server's graph for any set of models (`omni serve --models`).

The gateway routes each request by its ``model`` to the node serving it (read from the
descriptor: :mod:`mofa_omni.gateway.routes`), so a server is one gateway, one model node per
model, and the scheduler. With the default models this builds dataflows/server.yml (a test
holds the two together).
"""

from __future__ import annotations

from dataclasses import dataclass

from mofa_omni.contract.errors import ConfigError
from mofa_omni.contract.tasks import Task
from mofa_omni.launch.dataflows import Descriptor
from mofa_omni.models.catalog import ModelSpec

# Replies stream back through queues sized for a busy server (dora drops the oldest message
# of a full input queue).
REPLY_QUEUE = 256
UPLOADS_POOL_BYTES = 64 << 20  # uploads up to the gateway's 25 MiB body limit, with room
RESTARTS = {"restart_policy": "on-failure", "max_restarts": 3, "restart_delay": 1,
            "max_restart_delay": 8, "restart_window": 300}


@dataclass(frozen=True)
class Role:
    """How the gateway reaches a model node of one task."""

    node: str  # the node's id (a second model of the task gets -2, -3, ...)
    output: str  # the gateway's output feeding it
    input: str  # the node's input it arrives on
    reply_queue: int = REPLY_QUEUE
    pool_bytes: int = 0  # the node's shared-memory pool, when its replies are large
    # Further tasks the same weights serve on this node, each on an input named after it
    # (MiniLM reranks by cosine; an omni model also reads pictures and chats).
    also: tuple[Task, ...] = ()
    # Requests it serves at once (an LLM decoding several together); its replies are then
    # read with backpressure: dora dropped ~0.2 % of four chat streams' tokens without it,
    # none with it (the messages are small: the daemon path it takes costs nothing measured).
    parallel: int = 1


ROLES = {
    Task.TEXT_GENERATION: Role("llm", "chat", "request", reply_queue=4096, parallel=4),
    Task.SPEECH_RECOGNITION: Role("asr", "transcribe", "speech_recognition"),
    Task.SPEECH_SYNTHESIS: Role("tts", "speak", "request", reply_queue=1024,
                                pool_bytes=32 << 20),
    Task.EMBEDDING: Role("embedder", "embed", "request", also=(Task.RERANK,)),
    Task.RERANK: Role("reranker", "rank", "request"),
    Task.VISION_LANGUAGE: Role("vlm", "look", "vision_language"),
    Task.IMAGE_GENERATION: Role("images", "draw", "image_generation", pool_bytes=64 << 20),
    Task.OMNI: Role("omni", "hear", "omni", reply_queue=1024, pool_bytes=32 << 20,
                    also=(Task.VISION_LANGUAGE, Task.TEXT_GENERATION)),
}


def _role(spec: ModelSpec) -> Role:
    for task in spec.tasks:  # the model's first task the gateway serves decides its node
        if task in ROLES:
            return ROLES[task]
    raise ConfigError(f"model {spec.name!r} serves {', '.join(t.value for t in spec.tasks)}; "
                      f"the server's endpoints serve {', '.join(t.value for t in ROLES)}")


def server_graph(specs: list[ModelSpec], *, defaults: dict[Task, str]) -> Descriptor:
    """Gateway, one model node per spec, scheduler and the control node for `omni status`.
    A model that is its task's catalog default is named by TASK alone (as server.yml does)."""
    if not specs:
        raise ConfigError("a server needs at least one model")
    gateway_inputs: dict = {}
    outputs: list[str] = []
    scheduler_inputs: dict = {}
    model_nodes = []
    used: set[str] = set()
    for spec in specs:
        role = _role(spec)
        task = next(task for task in spec.tasks if ROLES.get(task) == role)
        node_id, number = role.node, 2
        while node_id in used:
            node_id, number = f"{role.node}-{number}", number + 1
        used.add(node_id)
        served = [(role.input, role.output)] + [(also.value, ROLES[also].output)
                                                for also in role.also if also in spec.tasks]
        inputs = {name: {"source": f"gateway/{output}", "queue_size": 256}
                  for name, output in served}
        inputs |= {"cancel": "gateway/cancel", "scheduler": "scheduler/command"}
        env = {"TASK": task.value, **({"PARALLEL": str(role.parallel)} if role.parallel > 1 else {})}
        if defaults.get(task) != spec.name:
            env["MODEL"] = spec.name
        entry = {"id": node_id, "path": "omni-node", **RESTARTS, "env": env}
        if role.pool_bytes:
            entry["shared_memory_pool_size"] = role.pool_bytes
        entry |= {"inputs": inputs, "outputs": ["result", "error", "lost", "memory"]}
        model_nodes.append(entry)
        outputs += [output for _, output in served if output not in outputs]
        gateway_inputs |= {
            node_id: {"source": f"{node_id}/result", "queue_size": role.reply_queue,
                      **({"queue_policy": "backpressure"} if role.parallel > 1 else {})},
            f"{node_id}_error": {"source": f"{node_id}/error", "queue_size": 256},
        }
        scheduler_inputs[node_id] = f"{node_id}/memory"
    gateway_inputs |= {f"{n['id']}_lost": f"{n['id']}/lost" for n in model_nodes}
    gateway_inputs["status"] = "scheduler/status"
    gateway = {"id": "gateway", "path": "omni-gateway", "inputs": gateway_inputs,
               "outputs": [*outputs, "cancel"], "shared_memory_pool_size": UPLOADS_POOL_BYTES}
    scheduler = {"id": "scheduler", "path": "omni-scheduler",
                 "inputs": {**scheduler_inputs, "control": "omni-control/control"},
                 "outputs": ["command", "status"]}
    control = {"id": "omni-control", "path": "dynamic",
               "inputs": {"status": "scheduler/status"}, "outputs": ["control"]}
    return {"nodes": [gateway, *model_nodes, scheduler, control]}
