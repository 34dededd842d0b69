//! Calibration and evaluation: the reference forward pass ([`forward`]), the one place that
//! holds a whole model in memory, in f32, to produce logits and to show calibration observers
//! the activations every linear layer sees.

pub mod forward;
