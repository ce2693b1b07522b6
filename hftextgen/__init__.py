"""hftextgen: train, fine-tune and evaluate GPT-2-style text generators from recipes."""

__version__ = "0.1.0"
