"""The three stages. Each `run(cfg) -> Artifact` reads top to bottom in five numbered
steps: inputs -> tokenizer/model -> data -> train -> publish."""
