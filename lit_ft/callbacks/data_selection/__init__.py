"""Data-selection family: GOT-D optimal-transport selection, LiST self-training, the LeTI feedback loop, black-box
prompt learning — techniques that choose or re-weight training examples (through the DataModule or
``batch["token_weights"]``) rather than change the loss of a step. No technique is in this family yet."""
