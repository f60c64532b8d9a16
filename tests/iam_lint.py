"""Run inside the separate .venv-iamlint (cloudsplaining + parliament): the findings on one policy file, as JSON.

    .venv-iamlint/bin/python tests/iam_lint.py POLICY.json  ->  {"cloudsplaining": {...}, "parliament": [...]}

cloudsplaining flags statements with conditions too (flag_conditional_statements, flag_resource_arn_statements):
a condition is not a reason to skip a privilege-escalation or resource-exposure check.
"""

import json
import sys

from cloudsplaining.scan.policy_document import PolicyDocument
from parliament import analyze_policy_string

text = open(sys.argv[1]).read()
doc = PolicyDocument(json.loads(text))
escalation = doc.allows_privilege_escalation
cloudsplaining = {
    "privilege_escalation": [{"type": e["type"], "actions": e["actions"]} for e in escalation],
    "resource_exposure": doc.permissions_management_without_constraints,
    "data_exfiltration": doc.allows_data_exfiltration_actions,
    "infrastructure_modification": doc.infrastructure_modification,
}
analyzed = analyze_policy_string(text)
parliament = [{"issue": f.issue, "severity": f.severity, "detail": f.detail, "location": f.location}
              for f in analyzed.findings]
print(json.dumps({"cloudsplaining": cloudsplaining, "parliament": parliament}, default=str))
