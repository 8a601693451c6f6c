"""Training: the launcher (launch.py) starts DeepSpeed ranks (rank.py) as separate processes and
streams their curve (curve.py) to MLflow; distill.py trains a smaller student against a teacher's
logits; k8s.py renders the pod that runs the same ranks on a cluster."""
