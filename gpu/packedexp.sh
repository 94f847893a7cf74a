python3 gpu/fp4_packed_exp.py ${PK_BUDGET:-420} ${PK_MS:-1,16,64,256,1024,4096}
