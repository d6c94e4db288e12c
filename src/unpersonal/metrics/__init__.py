"""Figures that both the trainers and the evaluation compute: ROC-AUC with its bootstrap
intervals (`auc`) and the linear probe of a feature space (`probe`)."""
