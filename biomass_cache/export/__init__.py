"""A model for the field: runs exported as one ONNX graph, and the torch-free predictor that runs it."""
