//! AdamW, the learning-rate schedules and gradient clipping, with the arithmetic of PyTorch's
//! `torch.optim.AdamW` (single-tensor path), transformers' schedule functions and
//! `torch.nn.utils.clip_grad_norm_`, so a step here and a step there agree.

use std::str::FromStr;

/// AdamW hyper-parameters; the defaults are transformers' `TrainingArguments` defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter's first and second moments.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    pub fn zeros(n: usize) -> Moments {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

impl AdamW {
    /// One update of `p` with gradient `g` at 1-based `step` and learning rate `lr`, in
    /// PyTorch's order: decoupled decay, moment updates, bias-corrected step.
    pub fn update(&self, p: &mut [f32], g: &[f32], s: &mut Moments, step: u64, lr: f64) {
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bc1 = 1.0 - self.beta1.powi(step as i32);
        let bc2 = 1.0 - self.beta2.powi(step as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.eps as f32;
        let decay = 1.0 - (lr * self.weight_decay) as f32;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(&mut s.m).zip(&mut s.v) {
            *p *= decay;
            // torch: m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, 1 - beta2)
            *m += (g - *m) * (1.0 - b1);
            *v = *v * b2 + (1.0 - b2) * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p -= step_size * (*m / denom);
        }
    }
}

/// How the learning rate moves after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// transformers' `get_cosine_schedule_with_warmup` (half a cosine down to 0).
    Cosine,
    /// `get_linear_schedule_with_warmup` (straight down to 0 at the last step).
    Linear,
    /// `get_constant_schedule_with_warmup`.
    Constant,
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cosine" => Ok(Schedule::Cosine),
            "linear" => Ok(Schedule::Linear),
            "constant" => Ok(Schedule::Constant),
            _ => Err(format!("`{s}`: give cosine, linear or constant")),
        }
    }
}

impl Schedule {
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Cosine => "cosine",
            Schedule::Linear => "linear",
            Schedule::Constant => "constant",
        }
    }

    /// The multiplier of the base learning rate for the optimizer step with 0-based index
    /// `step` of `total`, as transformers' `LambdaLR` evaluates it (the first step of a warmup
    /// runs at 0).
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((total.saturating_sub(step)) as f64
                / total.saturating_sub(warmup).max(1) as f64)
                .max(0.0),
            Schedule::Cosine => {
                let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// The L2 norm over every gradient, and the scaling `clip_grad_norm_` applies when it is above
/// `max_norm` (`max_norm <= 0` turns clipping off). Returns the norm before clipping.
pub fn clip(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let sq: f64 = grads
        .iter()
        .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .sum();
    let norm = sq.sqrt();
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            let c = coef as f32;
            for g in grads.iter_mut() {
                g.iter_mut().for_each(|x| *x *= c);
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_adamw_step_moves_each_weight_by_about_the_learning_rate() {
        // With bias correction, step 1's update is lr * g / (|g| + eps') = lr * sign(g).
        let opt = AdamW::default();
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = [0.3f32, -0.01, 4.0];
        let mut s = Moments::zeros(3);
        opt.update(&mut p, &g, &mut s, 1, 1e-3);
        for (a, b) in p.iter().zip([0.999f32, -1.999, 0.499]) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
        assert!((s.m[0] - 0.03).abs() < 1e-7 && (s.v[2] - 0.016).abs() < 1e-6);
    }

    #[test]
    fn weight_decay_is_decoupled_from_the_gradient() {
        let opt = AdamW {
            weight_decay: 0.1,
            ..AdamW::default()
        };
        let mut p = vec![2.0f32];
        let mut s = Moments::zeros(1);
        opt.update(&mut p, &[0.0], &mut s, 1, 0.5);
        // Zero gradient: only the decay acts, p * (1 - lr * wd).
        assert!((p[0] - 1.9).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn schedules_follow_transformers_lambdas() {
        let c = Schedule::Cosine;
        assert_eq!(c.factor(0, 10, 100), 0.0);
        assert_eq!(c.factor(5, 10, 100), 0.5);
        assert_eq!(c.factor(10, 10, 100), 1.0);
        assert!((c.factor(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(c.factor(100, 10, 100).abs() < 1e-12);
        let l = Schedule::Linear;
        assert!((l.factor(55, 10, 100) - 0.5).abs() < 1e-12);
        assert_eq!(l.factor(0, 0, 4), 1.0);
        assert_eq!(Schedule::Constant.factor(99, 0, 100), 1.0);
    }

    #[test]
    fn clipping_scales_the_global_norm_down_to_the_limit_only() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        assert_eq!(clip(&mut g, 10.0), 5.0);
        assert_eq!(g, vec![vec![3.0], vec![4.0]]);
        assert_eq!(clip(&mut g, 1.0), 5.0);
        let n: f32 = (g[0][0].powi(2) + g[1][0].powi(2)).sqrt();
        assert!((n - 1.0).abs() < 1e-5, "{g:?}");
    }
}
