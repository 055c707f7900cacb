from transfusion.model.transfusion import TransfusionModel, build_model

__all__ = ["TransfusionModel", "build_model"]
