"""The ECS target: network, IAM, GPU hosts (launch template, Auto Scaling group, capacity provider), the
service and its load balancer, the offline batch task, and the deploy that records each step. Never imports
the local target."""
