"""The GPU check kit: build it here (``make gpu-kit``), run it on an offline GPU machine (``.gpu-kit/run.sh``)."""
