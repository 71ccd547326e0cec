"""DVC stage ``profile``: speed and memory of each pruning method against the analytic limit; figures to the registry.

(Not ``pipelines/profile.py``: stage scripts run with ``pipelines/`` first on ``sys.path``, and that
name would hide the standard library's ``profile`` module, which transformers imports.)
"""

from common import ROOT, publish, stage

from covipal.profiling.stage import attach_to_registered, run_profile


def main() -> None:
    with stage("profile", ["profile", "pruning"]) as (params, run):
        out = ROOT / "plots" / "profile"
        result = run_profile(params, ROOT / "models" / "base", ROOT / "models" / "ppm", out, ROOT / "plots")
        publish(run, "profile", result["metrics"])
        run.artifact(out)
        from covipal.tracking import tracking_uri

        attached = attach_to_registered(ROOT / "metrics" / "register.json",
                                        [out / "speedup.png", out / "frames.png", out / "report.md"],
                                        result["metrics"], tracking_uri(params.tracking.tracking_uri, ROOT))
        print(result["report"])
        print("figures attached to", f"{attached['name']} v{attached['version']}" if attached
              else "no registered PPM version (metrics/register.json missing)")


if __name__ == "__main__":
    main()
