"""Demo models trained on easy-VQA: data, training and evaluation."""
