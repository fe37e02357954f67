"""Unit tests of the torch bridge (onnxgrow.bridge) on small hand-built graphs."""
