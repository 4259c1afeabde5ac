//! exp, tanh and sigmoid for f32 as straight-line arithmetic that the compiler vectorises.
//! libm's `tanhf` / `expm1f` are scalar calls the compiler cannot vectorise (PERF.md, "Gates").
//!
//! exp: x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to r^7 (truncation
//! error < 2e-9 relative, below f32's 6e-8 ulp), times 2^n built from the exponent bits.
//! tanh: (1 - e)/(1 + e) with e = exp(-2|x|), except for 2|x| < ln2/2 where 1 - e would
//! cancel; there m = expm1(2|x|) comes straight from the series without the leading 1 and
//! tanh = m/(m + 2).
//! gate: tanh(f) sigmoid(g) of the gated PixelCNN with one series per argument and one
//! division: tanh(a) = -m / (m + 2) with m = expm1(-2a) for a >= 0, where expm1(y) =
//! 2^n expm1(r) + (2^n - 1) has no cancellation for y <= 0 (the sum lies in (-1, -0.29] when
//! n < 0), so tanh(f) sigmoid(g) = -m / ((m + 2)(1 + e^-g)).
//! Accuracy against f64 on [-20, 20] is checked by the tests (exp within 1.5 ulp, tanh 3,
//! sigmoid 2.5, the gate 4).
//! The gate's functions take `FMA`: true fuses each Horner step (one rounding, half the
//! instructions and latency of the series), for callers compiled for a target with FMA. exp,
//! tanh and sigmoid stay unfused, so the ops that use them give the same bits on any x86-64.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for |n| < 2^11.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// a b + c, in one rounding with `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// exp(r) - 1 for |r| <= ln2/2 (Taylor to r^8 in Horner form; no leading 1, so no cancellation).
#[inline(always)]
fn expm1_small(r: f32) -> f32 {
    expm1_series::<false>(r)
}

/// With `FMA` the same series in Estrin's form (pairs of terms, then pairs of pairs): a chain
/// of four dependent steps instead of eight, so that more elements are in flight at once.
#[inline(always)]
fn expm1_series<const FMA: bool>(r: f32) -> f32 {
    if FMA {
        let (r2, m) = (r * r, |a: f32, b: f32, c: f32| a.mul_add(b, c));
        let r4 = r2 * r2;
        let lo = m(m(1.0 / 24.0, r, 1.0 / 6.0), r2, m(0.5, r, 1.0));
        let hi = m(m(1.0 / 40320.0, r, 1.0 / 5040.0), r2, m(1.0 / 720.0, r, 1.0 / 120.0));
        return m(hi, r4, lo) * r;
    }
    let p = 1.0 / 40320.0;
    let p = madd::<FMA>(p, r, 1.0 / 5040.0);
    let p = madd::<FMA>(p, r, 1.0 / 720.0);
    let p = madd::<FMA>(p, r, 1.0 / 120.0);
    let p = madd::<FMA>(p, r, 1.0 / 24.0);
    let p = madd::<FMA>(p, r, 1.0 / 6.0);
    let p = madd::<FMA>(p, r, 0.5);
    let p = madd::<FMA>(p, r, 1.0);
    p * r
}

/// e^x; saturates to 0 below -87.3 (instead of subnormals) and to ~2^127 above 88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

#[inline(always)]
fn exp_with<const FMA: bool>(x: f32) -> f32 {
    let x = x.max(-87.3).min(88.0);
    // Adding 1.5 * 2^23 rounds x log2(e) to an integer n held in the low mantissa bits: no
    // float-to-int conversion, which would keep the loop from vectorising.
    let t = x * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let two_n = f32::from_bits((t.to_bits().wrapping_sub(ROUNDER.to_bits()).wrapping_add(127)) << 23);
    (expm1_series::<FMA>(r) + 1.0) * two_n
}

const ROUNDER: f32 = 12_582_912.0; // 1.5 * 2^23

/// tanh(x).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs().min(10.0); // tanh(10) = 1 - 4e-9: 1.0 in f32
    let small = {
        let m = expm1_small(2.0 * a);
        m / (m + 2.0)
    };
    let large = {
        let e = exp(-2.0 * a);
        (1.0 - e) / (1.0 + e)
    };
    let t = if 2.0 * a < 0.346_573_6 { small } else { large };
    t.copysign(x)
}

/// 1 / (1 + e^-x).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// e^y - 1 for y in [-20, 0] (see the module header).
#[inline(always)]
fn expm1_nonpositive<const FMA: bool>(y: f32) -> f32 {
    let t = y * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let r = y - n * LN2_HI - n * LN2_LO;
    let two_n = f32::from_bits((t.to_bits().wrapping_sub(ROUNDER.to_bits()).wrapping_add(127)) << 23);
    madd::<FMA>(two_n, expm1_series::<FMA>(r), two_n - 1.0)
}

/// (numerator, denominator) of tanh(x) = -m / (m + 2), m = expm1(-2|x|), the numerator signed.
#[inline(always)]
fn tanh_ratio<const FMA: bool>(x: f32) -> (f32, f32) {
    let m = expm1_nonpositive::<FMA>(-2.0 * x.abs().min(10.0));
    ((-m).copysign(x), m + 2.0)
}

/// tanh(f) sigmoid(g) with one division.
#[inline(always)]
pub fn gate<const FMA: bool>(f: f32, g: f32) -> f32 {
    let (num, den) = tanh_ratio::<FMA>(f);
    num / (den * (1.0 + exp_with::<FMA>(-g)))
}

/// (tanh(f), sigmoid(g)) with one division, for the gate's derivative.
#[inline(always)]
pub fn gate_parts<const FMA: bool>(f: f32, g: f32) -> (f32, f32) {
    let (num, den) = tanh_ratio::<FMA>(f);
    let q = 1.0 + exp_with::<FMA>(-g);
    let r = 1.0 / (den * q);
    (num * q * r, den * r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error against f64, on a dense grid over [-20, 20] plus tiny values.
    #[test]
    fn within_a_few_ulp_of_f64() {
        let mut xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).collect();
        xs.extend([1e-30f32, -1e-30, 1e-8, -3e-7, 0.0, -0.0, 0.1733, 0.17329, -0.1734]);
        let ulp = f32::EPSILON as f64;
        let (mut e_exp, mut e_tanh, mut e_sig) = (0f64, 0f64, 0f64);
        for &x in &xs {
            let xd = x as f64;
            let rel =
                |got: f32, want: f64| if want == 0.0 { got.abs() as f64 } else { ((got as f64 - want) / want).abs() };
            e_exp = e_exp.max(rel(exp(x), xd.exp()));
            e_tanh = e_tanh.max(rel(tanh(x), xd.tanh()));
            e_sig = e_sig.max(rel(sigmoid(x), 1.0 / (1.0 + (-xd).exp())));
        }
        assert!(e_exp < 1.5 * ulp, "exp: {e_exp:e}");
        assert!(e_tanh < 3.0 * ulp, "tanh: {e_tanh:e}");
        assert!(e_sig < 2.5 * ulp, "sigmoid: {e_sig:e}");
        // The gate and its parts, with g running against f, unfused and fused.
        type Gate = (fn(f32, f32) -> f32, fn(f32, f32) -> (f32, f32));
        let both: [Gate; 2] = [(gate::<false>, gate_parts::<false>), (gate::<true>, gate_parts::<true>)];
        for (fma, (gate, gate_parts)) in both.into_iter().enumerate() {
            let (mut e_gate, mut e_t, mut e_s) = (0f64, 0f64, 0f64);
            for (&f, &g) in xs.iter().zip(xs.iter().rev()) {
                let (fd, gd) = (f as f64, g as f64);
                let (t, s) = (fd.tanh(), 1.0 / (1.0 + (-gd).exp()));
                let rel = |got: f32, want: f64| {
                    if want == 0.0 {
                        got.abs() as f64
                    } else {
                        ((got as f64 - want) / want).abs()
                    }
                };
                e_gate = e_gate.max(rel(gate(f, g), t * s));
                let (pt, ps) = gate_parts(f, g);
                e_t = e_t.max(rel(pt, t));
                e_s = e_s.max(rel(ps, s));
            }
            assert!(e_gate < 4.0 * ulp, "gate (fma {fma}): {e_gate:e}");
            assert!(e_t < 4.0 * ulp && e_s < 4.0 * ulp, "gate parts (fma {fma}): {e_t:e}, {e_s:e}");
            assert_eq!(gate(-0.0, 1.0).to_bits(), (-0.0f32).to_bits());
            assert_eq!(gate(50.0, 200.0), 1.0);
        }
        // Signs, symmetry and saturation.
        assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
        assert_eq!(sigmoid(200.0), 1.0);
        assert!(sigmoid(-200.0) >= 0.0 && sigmoid(-200.0) < 1e-37);
        assert_eq!(exp(0.0), 1.0);
    }
}
