"""An in-process Flower Grid of deployed devices, for federations without Ray or a SuperLink."""

from __future__ import annotations


class DeviceGrid:
    """An in-process Grid of deployed devices: each node is our ClientApp's handler with its own device node
    config (its own text, store and --compute-dtype), the tasks run in this process."""

    def __init__(self, nodes: dict[int, object]) -> None:
        from flwr.app import Context, RecordDict

        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config=dn.to_node_config(), state=RecordDict(), run_config={}
            )
            for node, dn in nodes.items()
        }
        self.replies: list = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: list) -> list[str]:
        from uuid import uuid4

        from fedpeft.flower.client_app import describe, evaluate, train

        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            handler = {"query": describe, "train": train, "evaluate": evaluate}[m.metadata.message_type]
            self.replies.append(handler(m, self.contexts[m.metadata.dst_node_id]))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: set[str]) -> list:
        out = [r for r in self.replies if r.metadata.reply_to_message_id in message_ids]
        self.replies = [r for r in self.replies if r not in out]
        return out
