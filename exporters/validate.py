def validate(*a, **k): raise NotImplementedError
class ValidationReport: pass
