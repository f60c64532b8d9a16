"""The embedded default: local stand-ins for AWS (moto server), the Hugging Face Hub
(a local hub server) and the default model, so every flow runs on real answers on one machine."""
