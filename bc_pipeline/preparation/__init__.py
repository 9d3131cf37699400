"""Stage 3, preparing the training data: leakage-free stratified splits (``splits``) and the balanced
training set (``balancing``: class weights, oversampling, SMOTE)."""
