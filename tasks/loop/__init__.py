"""The closed loop around the served model: shadow, canary, promote or roll back (rollout.py), drift
and SLO checks that retrigger training (drift.py), scaling advice (autoscale.py), cost per token
(cost.py), and live or synthetic traffic (traffic.py)."""
