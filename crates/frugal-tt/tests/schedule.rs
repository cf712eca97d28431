//! The two-stage CoMERA objective and its config.

use frugal_tt::{late_objective, ComeraConfig, ComeraSchedule, Objective};

#[test]
fn defaults_are_the_published_ones() {
    let c = ComeraConfig::default();
    assert_eq!(c.penalty_weight, 0.01);
    assert_eq!(c.loss_target, 0.8);
    assert_eq!(c.threshold, 1e-2);
    assert!(c.validate().is_ok());
}

#[test]
fn compression_target_outside_unit_interval_is_an_error() {
    for bad in [0.0, -0.1, 1.5, f64::NAN] {
        let c = ComeraConfig {
            compression_target: bad,
            ..ComeraConfig::default()
        };
        let e = ComeraSchedule::new(c).unwrap_err().to_string();
        assert!(
            e.contains("tt.compression_target") && e.contains("(0, 1]"),
            "{e}"
        );
    }
    for good in [1.0, 0.0125] {
        let c = ComeraConfig {
            compression_target: good,
            ..ComeraConfig::default()
        };
        assert!(ComeraSchedule::new(c).is_ok());
    }
    let c = ComeraConfig {
        loss_target: 0.0,
        ..ComeraConfig::default()
    };
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("tt.loss_target"));
    let c = ComeraConfig {
        penalty_weight: -1.0,
        ..ComeraConfig::default()
    };
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("tt.penalty_weight"));
}

#[test]
fn unknown_config_keys_are_rejected() {
    let e = serde_json::from_str::<ComeraConfig>(r#"{"compression_targt": 0.5}"#).unwrap_err();
    assert!(e.to_string().contains("compression_targt"), "{e}");
    let c: ComeraConfig = serde_json::from_str(r#"{"early_steps": 5}"#).unwrap();
    assert_eq!((c.early_steps, c.compression_target), (5, 0.5));
}

#[test]
fn two_stages_pick_the_relatively_further_target() {
    let config = ComeraConfig {
        early_steps: 10,
        compression_target: 0.5,
        ..ComeraConfig::default()
    };
    let mut s = ComeraSchedule::new(config).unwrap();
    for step in [0, 5, 9] {
        assert_eq!(
            s.objective(step, 3.0, 1000.0),
            Objective::LossPlusPenalty(0.01)
        );
    }
    assert_eq!(s.size_target(), None);
    // First late step: size 100 latched, target 50; size gap 1.0 > loss gap 0.25.
    assert_eq!(s.objective(10, 1.0, 100.0), Objective::Size);
    assert_eq!(s.size_target(), Some(50.0));
    // Size gap 0.1 < loss gap 0.25.
    assert_eq!(s.objective(11, 1.0, 55.0), Objective::Loss);
    // Loss gap 0.0625 < size gap 0.2.
    assert_eq!(s.objective(12, 0.85, 60.0), Objective::Size);
    // The latched start does not move with later sizes.
    assert_eq!(s.objective(13, 0.85, 1000.0), Objective::Size);
    assert_eq!(s.late_start_size(), Some(100.0));
    // Both targets met: the larger (less negative) gap still decides.
    assert_eq!(late_objective(0.4, 0.8, 45.0, 50.0), Objective::Size);
    assert_eq!(late_objective(0.78, 0.8, 20.0, 50.0), Objective::Loss);
}
