"""Faces in photographs: detection (MTCNN), alignment to the training data's geometry."""
