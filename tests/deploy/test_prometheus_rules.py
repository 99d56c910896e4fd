"""deploy/prometheus: the real promtool checks the config and the rules and runs the rule
unit tests (rules_test.yml, series worked out by hand); every metric a rule reads is one the
service exports."""

from __future__ import annotations

import subprocess

import yaml
from deploy_helpers import DEPLOY, METRIC_NAME, RECORDING_NAME

PROMETHEUS = DEPLOY / "prometheus"


def _rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


def test_promtool_check_config_accepts_prometheus_yml(promtool: str) -> None:
    result = _promtool(promtool, "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # the config loads rules.yml, so the check covered the rules too
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr
    # the check covered both scrape jobs: the abstain pods and Triton's metrics port
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == ["abstain", "triton"]


def test_promtool_check_rules_accepts_rules_yml(promtool: str) -> None:
    result = _promtool(promtool, "check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    result = _promtool(promtool, "test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests_catch_a_broken_rule(promtool: str, tmp_path) -> None:
    """The unit tests are not vacuous: shorten one alert's `for` by a minute and they fail."""
    broken = (PROMETHEUS / "rules.yml").read_text().replace("for: 15m", "for: 14m")
    (tmp_path / "rules.yml").write_text(broken)
    (tmp_path / "rules_test.yml").write_text((PROMETHEUS / "rules_test.yml").read_text())
    result = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "AbstainAbstentionRateHigh" in result.stdout + result.stderr


def test_every_alert_has_a_firing_case_in_the_unit_tests() -> None:
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    tests = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == {
        "AbstainAbstentionRateHigh",
        "AbstainAbstentionRateLow",
        "AbstainRejectedInputsSpike",
        "AbstainTargetDown",
        "AbstainLiveRiskAboveCalibrated",
        "AbstainEstimatedRiskAboveCalibrated",
    }
    assert fired == alerts


def test_rules_read_only_metrics_the_service_exports(exported_metrics: frozenset[str]) -> None:
    used = {name for rule in _rules() for name in METRIC_NAME.findall(rule["expr"])}
    assert used, "no abstain_* metric found in rules.yml"
    assert used <= exported_metrics, f"not exported by the service: {sorted(used - exported_metrics)}"
    # the two metrics the brief's alerts are built on are actually used
    assert {"abstain_decisions_total", "abstain_target_coverage", "abstain_rejected_inputs_total"} <= used


def test_rules_reference_only_recording_rules_they_define() -> None:
    rules = _rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    used = {name for rule in rules for name in RECORDING_NAME.findall(rule["expr"])}
    assert used <= recorded, f"undefined recording rules: {sorted(used - recorded)}"
    assert "abstain:abstention_rate:ratio_rate5m" in recorded


def test_target_down_alert_watches_the_scrape_job_of_prometheus_yml() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    down = next(rule for rule in _rules() if rule.get("alert") == "AbstainTargetDown")
    assert 'job="abstain"' in down["expr"]
    assert "abstain" in jobs
    assert config["rule_files"] == ["rules.yml"]
