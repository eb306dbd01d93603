// Kubeflow Trainer v2.0.0's CRDs and its ClusterTrainingRuntimes for the cluster tests: data only (the Trainer's
// controller, which needs JobSet, is not built; the tests check the operator's TrainJobs against the real CRDs).
module spin.test/cluster/trainer

go 1.26.0

require github.com/kubeflow/trainer/v2 v2.0.0
