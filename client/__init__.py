from client.model import DistributedModelForCausalLM
from client.session import InferenceSession, NodeError

__all__ = ["DistributedModelForCausalLM", "InferenceSession", "NodeError"]
