"""Running Winnow on clusters it did not start: Ray Jobs submission (engine.cluster.submit) and
KubeRay manifests (engine.cluster.kuberay)."""
