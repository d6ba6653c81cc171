class Tensor:
    pass


class TensorSpec:
    pass


class DataType:
    DT_FLOAT = 0
    DT_FLOAT16 = 1
    DT_BF16 = 27
    DT_INT64 = 9
