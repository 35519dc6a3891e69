# The CLI defaults to ViT-B-16 with OpenAI weights, which tests cannot download: they name the tiny model.
TINY = ["--model", "negalign-tiny-test"]
